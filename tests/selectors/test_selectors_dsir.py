"""DSIR with a small target: add-α smoothing and per-n-gram normalisation against the reference
estimator (planted vocabularies, a hand-computed example, parameters, the small-target warning)."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest

from curate.errors import ParameterError
from curate.schema import make_record, texts, to_frame
from curate.selectors import DSIRSelector
from curate.selectors.baselines import dsir_bucket, dsir_counts, dsir_log_weights

VOCAB_A = [f"{w}{i}" for w in ("the", "house", "river", "green", "walk", "story", "paint", "city") for i in range(25)]
VOCAB_B = ["integral", "derivative", "matrix", "eigenvalue", "theorem", "lemma", "proof", "vector", "limit",
           "series", "prime", "modulo", "polynomial", "root", "tangent", "sum", "product", "factor", "ratio", "slope"]


def _sft(text: str, answer: str = "") -> dict:
    return make_record("sft", messages=[{"role": "user", "content": text}, {"role": "assistant", "content": answer}])


def _target(text: str) -> dict:
    return make_record("target", task="planted", messages=[{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def planted() -> tuple[pl.DataFrame, pl.DataFrame, set[str]]:
    """400 generic rows (vocabulary A, 3..60 words), 20 in-domain rows (vocabulary B with some A
    words, 30..50 words), a 12-row target of vocabulary B (10 words each)."""
    rng = np.random.default_rng(0)
    generic = [_sft(" ".join(rng.choice(VOCAB_A, int(rng.integers(3, 61))))) for _ in range(400)]
    inside = []
    for _ in range(20):
        n = int(rng.integers(30, 51))
        words = [str(rng.choice(VOCAB_B)) if rng.uniform() < 0.7 else str(rng.choice(VOCAB_A)) for _ in range(n)]
        inside.append(_sft(" ".join(words)))
    targets = to_frame([_target(" ".join(rng.choice(VOCAB_B, 10))) for _ in range(12)])
    pool = to_frame(generic + inside)
    return pool, targets, {r["uid"] for r in inside}


def _run(sel: DSIRSelector, pool: pl.DataFrame, targets: pl.DataFrame, inside: set[str], k: int = 20,
         seed: int = 0) -> tuple[float, float]:
    """(share of the k picks that are in-domain, mean n-gram count of the picks / pool mean)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sel.select(pool, {}, k, targets=targets, seed=seed)
    ng = dict(zip(pool["uid"].to_list(), dsir_counts(texts(pool, sel.text_field), sel.n_buckets, sel.ngrams).sum(1),
                  strict=True))
    kept = res.kept_uids
    precision = float(np.mean([u in inside for u in kept]))
    return precision, float(np.mean([ng[u] for u in kept]) / np.mean(list(ng.values())))


def test_selectors_dsir_small_target_default_beats_reference(planted) -> None:
    pool, targets, inside = planted
    prec_default, len_default = _run(DSIRSelector(top_k=True), pool, targets, inside)
    prec_ref, len_ref = _run(DSIRSelector(top_k=True, smoothing="reference"), pool, targets, inside)
    # the default finds the in-domain rows; the reference estimator does not
    assert prec_default >= 0.8 > prec_ref, (prec_default, prec_ref)
    # the reference weight is a length penalty: its picks are shorter than the pool's average row,
    # the default's are not (the in-domain rows are longer than average)
    assert len_ref < 1.0 <= len_default, (len_ref, len_default)
    # Gumbel resampling (the default top_k=False) keeps the in-domain preference
    prec_gumbel = np.mean([_run(DSIRSelector(), pool, targets, inside, seed=s)[0] for s in range(3)])
    assert prec_gumbel >= 0.8, prec_gumbel
    # the two changes alone: here the per-n-gram normalisation is what removes the length penalty
    assert _run(DSIRSelector(top_k=True, smoothing="reference", normalise=True), pool, targets, inside)[0] >= 0.8
    assert _run(DSIRSelector(top_k=True, normalise=False), pool, targets, inside)[0] < 0.8


def _tiny() -> tuple[pl.DataFrame, pl.DataFrame]:
    pool = to_frame([_sft("a b"), _sft("a c"), _sft("c"), _sft("")])
    return pool, to_frame([_target("a b")])


def test_selectors_dsir_reference_formula_by_hand() -> None:
    """Unigrams only, 3 rows with text plus one empty row: counts a:2 b:1 c:2 (C = 5), target a:1 b:1."""
    assert len({dsir_bucket(g, 10000) for g in "abc"}) == 3  # no hash collision among a, b, c
    pool, tgt = _tiny()
    eps = 1e-8
    u_a = np.log(0.5 + eps) - np.log(0.4 + eps)
    u_b = np.log(0.5 + eps) - np.log(0.2 + eps)
    u_c = np.log(eps) - np.log(0.4 + eps)
    want = {"a b": u_a + u_b, "a c": u_a + u_c, "c": u_c, "": 0.0}
    sel = DSIRSelector(smoothing="reference", ngrams=1, text_field="prompt", target_field="prompt", top_k=True)
    with pytest.warns(UserWarning, match="2 n-gram tokens"):
        res = sel.select(pool, {}, 2, targets=tgt)
    frame = res.frame.with_columns(pl.Series("text", texts(pool, "prompt")))
    for row in frame.iter_rows(named=True):
        assert row["logw"] == pytest.approx(want[row["text"]], rel=1e-12, abs=1e-12)
        assert row["key"] == row["logw"]
    assert res.kept_uids == [pool["uid"][0], pool["uid"][3]]  # a b (log w > 0), then the empty row (0)
    # Gumbel: key = log w + Gumbel noise drawn in uid order from the seed
    with pytest.warns(UserWarning, match="cannot be estimated"):
        res = DSIRSelector(**{**sel.params(), "top_k": False}).select(pool, {}, 2, targets=tgt, seed=7)
    order = np.argsort(res.frame["uid"].to_numpy(), kind="stable")
    noise = np.empty(4)
    noise[order] = np.random.default_rng(7).gumbel(size=4)
    np.testing.assert_allclose(res.frame["key"].to_numpy(), res.frame["logw"].to_numpy() + noise, rtol=1e-12)


def test_selectors_dsir_add_alpha_by_hand() -> None:
    """The same example with add-α smoothing, per-n-gram normalisation and an empty row (ℓ = 0)."""
    pool, tgt = _tiny()
    alpha, b = 0.5, 10000
    lp_raw = {g: np.log((c + alpha) / (5 + alpha * b)) for g, c in {"a": 2, "b": 1, "c": 2}.items()}
    lp_tgt = {g: np.log((c + alpha) / (2 + alpha * b)) for g, c in {"a": 1, "b": 1, "c": 0}.items()}
    u = {g: lp_tgt[g] - lp_raw[g] for g in "abc"}
    want = {"a b": (u["a"] + u["b"]) / 2, "a c": (u["a"] + u["c"]) / 2, "c": u["c"], "": 0.0}
    with pytest.warns(UserWarning, match="cannot be estimated"):
        res = DSIRSelector(ngrams=1, text_field="prompt", target_field="prompt", top_k=True).select(
            pool, {}, 2, targets=tgt)
    frame = res.frame.with_columns(pl.Series("text", texts(pool, "prompt")))
    n_mean = 5 / 4  # the key is n̄·ℓ: the weight at the pool's mean n-gram count
    for row in frame.iter_rows(named=True):
        assert row["logw"] == pytest.approx(want[row["text"]], rel=1e-12, abs=1e-12)
        assert row["key"] == pytest.approx(n_mean * want[row["text"]], rel=1e-12, abs=1e-12)
    # the module function gives the same numbers; unnormalised it is Σ_b c_b(x)·u_b
    counts = dsir_counts(texts(pool, "prompt"), b, 1)
    tcounts = dsir_counts(texts(tgt, "prompt"), b, 1)
    raw = dsir_log_weights(counts, tcounts, alpha=alpha, normalise=False)
    np.testing.assert_allclose(raw, [u["a"] + u["b"], u["a"] + u["c"], u["c"], 0.0], rtol=1e-12)
    assert dsir_log_weights(counts, tcounts, alpha=alpha)[3] == 0.0


def test_selectors_dsir_parameters() -> None:
    assert DSIRSelector().smoothing == "add_alpha" and DSIRSelector().alpha == 0.5
    assert DSIRSelector().per_ngram and not DSIRSelector(smoothing="reference").per_ngram
    assert DSIRSelector(smoothing="reference", normalise=True).per_ngram
    assert not DSIRSelector(normalise=False).per_ngram
    for bad in (0, 0.0, -1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ParameterError, match="'alpha' parameter of DSIR must be a finite number > 0"):
            DSIRSelector(alpha=bad)
    for bad in ("laplace", "", "Reference", None):
        with pytest.raises(ParameterError, match=r"'smoothing' parameter of DSIR must be one of \['add_alpha'"):
            DSIRSelector(smoothing=bad)
    for bad in ("yes", 1, 0.0):
        with pytest.raises(ParameterError, match="'normalise' parameter of DSIR must be True or False"):
            DSIRSelector(normalise=bad)
    with pytest.raises(ParameterError, match="'smoothing' parameter"):
        dsir_log_weights(np.ones((2, 3)), np.ones((1, 3)), smoothing="laplace")


def test_selectors_dsir_small_target_warning() -> None:
    pool = to_frame([_sft(f"w{i} x{i} y{i}") for i in range(30)])
    tiny = to_frame([_target("w1 x1"), _target("w2 y2")])
    with pytest.warns(UserWarning, match=r"the target has 6 n-gram tokens \(2 rows\) for 10000 hash buckets"):
        DSIRSelector().select(pool, {}, 5, targets=tiny)
    with pytest.warns(UserWarning, match="6 n-gram tokens"):
        DSIRSelector(smoothing="reference").select(pool, {}, 5, targets=tiny)
    with warnings.catch_warnings():  # 6 tokens for 4 buckets: estimable, no warning
        warnings.simplefilter("error")
        DSIRSelector(n_buckets=4).select(pool, {}, 5, targets=tiny)
