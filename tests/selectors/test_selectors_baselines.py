"""Baselines: DEITA planted clusters, DSIR planted vocabulary, k-center cover, top-k, random."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from curate.features.store import FeatureSet
from curate.schema import make_record, texts, to_frame
from curate.selectors import DeitaSelector, DSIRSelector, KCenterSelector, RandomSelector, TopKSelector
from curate.selectors.baselines import dsir_bucket, dsir_counts, kl_divergence
from curate.testing import toy_table, uid_frame


def _feats(table: pl.DataFrame, x: np.ndarray, role: str = "embed") -> dict[str, FeatureSet]:
    return {role: FeatureSet(role, np.asarray(table["uid"].to_list(), dtype=object), x)}


def test_selectors_deita_planted_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    x = np.vstack([c + 0.01 * rng.normal(size=(5, 16)) for c in centres] + [rng.normal(size=(40, 16))])
    n = len(x)
    table = uid_frame(n)
    score = np.concatenate([10 + rng.uniform(size=15), rng.uniform(size=40)])
    table = table.with_columns(pl.Series("quality", score))
    res = DeitaSelector(score_columns=("quality",), threshold=0.9).select(table, _feats(table, x), 20)
    kept = set(res.kept_uids)
    for c in range(3):
        members = list(range(5 * c, 5 * c + 5))
        best = members[int(np.argmax(score[members]))]
        assert [m for m in members if f"u{m:08d}" in kept] == [best]
        for m in members:
            if m != best:
                assert res.frame.row(m, named=True)["reason"] == f"near_duplicate_of:u{best:08d}"
    e = x / np.linalg.norm(x, axis=1, keepdims=True)
    idx = [int(u[1:]) for u in res.kept_uids]
    sims = e[idx] @ e[idx].T
    np.fill_diagonal(sims, -1)
    assert sims.max() <= 0.9


def test_selectors_deita_duplicates_and_distilabel() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8))
    x[7] = x[3]
    table = uid_frame(30).with_columns(pl.Series("quality", np.linspace(1, 2, 30)[::-1]))
    feats = _feats(table, x)
    deita = DeitaSelector(score_columns=("quality",)).select(table, feats, 30)
    assert "u00000003" in deita.kept_uids and "u00000007" not in deita.kept_uids
    dist = DeitaSelector(score_columns=("quality",), mode="distilabel", threshold=0.01).select(table, feats, 30)
    assert "u00000003" not in dist.kept_uids and "u00000007" not in dist.kept_uids
    perm = rng.permutation(30)
    again = DeitaSelector(score_columns=("quality",)).select(table[perm.tolist()], feats, 30)
    assert again.kept_uids == deita.kept_uids


def test_selectors_dsir_golden_bucket() -> None:
    # int(sha256("hello world")) mod 10000, computed independently with hashlib
    import hashlib

    assert dsir_bucket("hello world", 10000) == int(hashlib.sha256(b"hello world").hexdigest(), 16) % 10000
    assert dsir_bucket("hello world", 10000) == 1529  # golden: `echo -n "hello world" | sha256sum` mod 10000
    c = dsir_counts(["Hello, world!"], 10000, 2)
    assert c.sum() == 4 + 3  # tokens: hello , world !  → 4 unigrams + 3 bigrams


def _rows(texts_: list[str]) -> pl.DataFrame:
    return to_frame([make_record("sft", messages=[{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}])
                     for t in texts_])


def test_selectors_dsir_planted_vocabulary() -> None:
    rng = np.random.default_rng(2)
    generic = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "by", "at", "be", "this", "have", "from"]
    planted = ["integral", "derivative", "matrix", "eigenvalue", "theorem", "lemma", "proof", "vector"]
    pool_text = [" ".join(rng.choice(generic, 12)) for _ in range(1000)]
    pool_text += [" ".join(rng.choice(generic, 6)) + " " + " ".join(rng.choice(planted, 6)) for _ in range(100)]
    pool = _rows(pool_text)
    tgt = to_frame([make_record("target", task="math", messages=[{"role": "user", "content": " ".join(rng.choice(planted, 10))}])
                    for _ in range(20)])
    res = DSIRSelector(top_k=True).select(pool, {}, 100, targets=tgt)
    planted_uids = set(pool["uid"].to_list()[1000:])
    assert len(planted_uids & set(res.kept_uids)) >= 90
    # Gumbel resampling: selected n-gram distribution closer to the target than a random sample (KL)
    sel = DSIRSelector().select(pool, {}, 100, targets=tgt, seed=3)
    rnd = RandomSelector().select(pool, {}, 100, seed=3)
    p_tgt = dsir_counts(texts(tgt, "prompt+response"), 10000, 2).sum(0)

    def kl(uids: list[str]) -> float:
        sub = pool.filter(pl.col("uid").is_in(uids))
        return kl_divergence(p_tgt, dsir_counts(texts(sub, "prompt+response"), 10000, 2).sum(0))

    assert kl(sel.kept_uids) < kl(rnd.kept_uids)
    a = DSIRSelector().select(pool, {}, 100, targets=tgt, seed=3).frame
    assert a["key"].equals(sel.frame["key"])
    b = DSIRSelector(n_buckets=5000).select(pool, {}, 100, targets=tgt, seed=3).frame
    assert not np.allclose(a["logw"].to_numpy(), b["logw"].to_numpy())


def test_selectors_kcenter_cover_and_2_approx() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 3))
    table = uid_frame(300)
    res = KCenterSelector().select(table, _feats(table, x), 10, seed=1)
    idx = [int(u[1:]) for u in res.kept_uids]
    d = np.sqrt(((x[:, None, :] - x[idx][None]) ** 2).sum(-1)).min(1)
    assert np.isclose(d.max(), res.diagnostics["cover_radius"])
    # farthest-first: each pick was the farthest point from the picks before it
    for t in range(1, len(idx)):
        dt = np.sqrt(((x[:, None, :] - x[idx[:t]][None]) ** 2).sum(-1)).min(1)
        assert np.isclose(dt[idx[t]], dt.max())


def test_selectors_topk_and_random() -> None:
    t = toy_table(50, 0).with_columns(pl.when(pl.int_range(50) == 3).then(None).otherwise(pl.col("score")).alias("s"))
    res = TopKSelector(column="s").select(t, {}, 10)
    top = t.drop_nulls("s").sort(["s", "uid"], descending=[True, False]).head(10)["uid"].to_list()
    assert res.kept_uids == top
    assert res.frame.filter(pl.col("uid") == t["uid"][3])["reason"].item() == "no_score"
    asc = TopKSelector(column="s", descending=False).select(t, {}, 5)
    assert asc.kept_uids == t.drop_nulls("s").sort(["s", "uid"]).head(5)["uid"].to_list()
    r1 = RandomSelector().select(t, {}, 10, seed=1).kept_uids
    r2 = RandomSelector().select(t, {}, 10, seed=2).kept_uids
    assert r1 != r2
    sub = RandomSelector().select(t.head(40), {}, 40, seed=1)  # a row's key does not depend on the pool
    assert set(r1) & set(t.head(40)["uid"]) <= set(sub.kept_uids)


def test_selectors_missing_column_errors() -> None:
    from curate.errors import SchemaError

    with pytest.raises(SchemaError, match="no score column 'nope'"):
        TopKSelector(column="nope").select(toy_table(5), {}, 2)
