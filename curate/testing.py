"""Toy corpora with planted answers and the selector contract suite :func:`check_selector`."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import polars as pl

from curate.errors import MissingFeatureError, ParameterError
from curate.io.store import FeatureSet
from curate.schema import make_record, to_frame
from curate.selectors.base import Budget

_WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "apple", "river", "stone", "cloud", "green", "quick", "slow", "bright"]


def toy_table(n: int, seed: int = 0, *, prefix: str = "row") -> pl.DataFrame:
    """``n`` canonical sft rows with random word texts, plus numeric columns ``score``,
    ``complexity``, ``quality`` and ``n_tokens`` (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        q = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 9))))
        a = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 15))))
        recs.append(make_record("sft", messages=[{"role": "user", "content": f"{prefix} {i}: {q}"},
                                                 {"role": "assistant", "content": a}]))
    t = to_frame(recs)
    return t.with_columns(
        pl.Series("score", rng.normal(size=n)),
        pl.Series("complexity", rng.uniform(1, 6, size=n)),
        pl.Series("quality", rng.uniform(1, 6, size=n)),
        pl.Series("n_tokens", rng.integers(5, 50, size=n)),
    )


def toy_targets(m: int, seed: int = 1, tasks: tuple[str, ...] = ("math", "code", "qa")) -> pl.DataFrame:
    """``m`` target rows with task labels cycling over ``tasks`` and a short reference answer."""
    rng = np.random.default_rng(seed)
    recs = [
        make_record("target", task=tasks[i % len(tasks)],
                    messages=[{"role": "user", "content": f"target {i}: " + " ".join(rng.choice(_WORDS, size=6))}],
                    answer=" ".join(rng.choice(_WORDS, size=4)))
        for i in range(m)
    ]
    return to_frame(recs)


def toy_inputs(selector: Any, n: int = 60, m: int = 9, d: int = 6, seed: int = 0
               ) -> tuple[pl.DataFrame, dict[str, FeatureSet], pl.DataFrame]:
    """(pool table, features for every role the selector requires, target table)."""
    rng = np.random.default_rng(seed + 100)
    table = toy_table(n, seed)
    targets = toy_targets(m, seed + 1)
    feats: dict[str, FeatureSet] = {}
    roles = selector.required_features()
    for role in roles:
        if role.startswith("target_"):
            v = rng.normal(size=(m, d))
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            feats[role] = FeatureSet(role, np.asarray(targets["uid"].to_list(), dtype=object), v)
        elif role == "scores":
            fs = FeatureSet(role, np.asarray(table["uid"].to_list(), dtype=object), rng.normal(size=(n, m)))
            fs.meta["target_uids"] = targets["uid"].to_list()
            feats[role] = fs
        else:
            v = rng.normal(size=(n, d))
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            feats[role] = FeatureSet(role, np.asarray(table["uid"].to_list(), dtype=object), v)
    return table, feats, targets


class _Garbage:
    def __repr__(self) -> str:
        return "<garbage>"


def check_selector(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """The contract every registered selector passes (DESIGN.md "Selectors").

    Checks: every parameter is validated with the one error template (a nonsense value, plus the
    class's ``invalid_examples``); missing features raise :class:`MissingFeatureError`; one row per
    candidate, each once; the budget (n, fraction, tokens) is respected; rank is 1..k on kept rows;
    finite scores on kept rows and no NaN anywhere; non-empty reasons; same seed gives identical
    frames; shuffling the rows gives the same selection; a budget above the pool warns and keeps
    every row. Raises AssertionError naming the broken property.

    ``params`` are the constructor arguments to use. When None and the class has a classmethod
    ``contract_params(folder: Path, table: pl.DataFrame) -> dict``, that hook supplies them (it may
    write files, e.g. judged pairs, into ``folder``; ``table`` is the toy pool the checks use).
    """
    if params is None and hasattr(cls, "contract_params"):
        import tempfile
        from pathlib import Path

        folder = Path(tempfile.mkdtemp(prefix=f"check_{getattr(cls, 'name', 'selector')}_"))
        params = cls.contract_params(folder, toy_table(n, seed))
    params = dict(params or {})
    owner_prefix = "The '"
    # ---- parameter validation
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        bad_values = [_Garbage()] + [v for k, v in getattr(cls, "invalid_examples", ()) if k == f.name]
        for bad in bad_values:
            try:
                cls(**{**params, f.name: bad})
            except ParameterError as exc:
                msg = str(exc)
                assert msg.startswith(f"{owner_prefix}{f.name}' parameter of ") and " must be " in msg and "Got " in msg, (
                    f"{cls.__name__}: parameter '{f.name}' error does not follow the template: {msg}")
            else:
                raise AssertionError(f"{cls.__name__}: parameter '{f.name}' accepted the invalid value {bad!r}")
    sel = cls(**params)
    table, feats, targets = toy_inputs(sel, n=n, seed=seed)
    # ---- missing features
    for role in sel.required_features():
        less = {k: v for k, v in feats.items() if k != role}
        try:
            sel.select(table, less, 10, seed=seed, targets=targets)
        except MissingFeatureError:
            pass
        else:
            raise AssertionError(f"{cls.__name__}: missing feature role '{role}' did not raise MissingFeatureError")
    if feats:  # a uid missing from a pool feature set
        role = next(r for r in sel.required_features() if not r.startswith("target_"))
        fs = feats[role]
        cut = {**feats, role: FeatureSet(fs.name, fs.uids[1:], np.asarray(fs.values)[1:], dict(fs.meta))}
        try:
            sel.select(table, cut, 10, seed=seed, targets=targets)
        except MissingFeatureError:
            pass
        else:
            raise AssertionError(f"{cls.__name__}: a uid missing from '{role}' did not raise MissingFeatureError")
    # ---- budgets
    for budget, limit in ((7, 7), (0.25, int(0.25 * n)), ({"n": 1}, 1)):
        res = sel.select(table, feats, budget, seed=seed, targets=targets)
        _check_frame(cls, res.frame, table, limit)
    for budget in (7, 0.25):
        res = sel.select(table, feats, budget, seed=seed, targets=targets)
        if sel.fills_budget():
            want = Budget.parse(budget).rows(n)
            assert res.n_kept == want, f"{cls.__name__}: kept {res.n_kept} rows for a budget of {want}"
    res = sel.select(table, feats, {"tokens": 200}, seed=seed, targets=targets)
    _check_frame(cls, res.frame, table, n)
    kept_tokens = res.frame.join(table.select("uid", "n_tokens"), on="uid").filter(pl.col("keep"))["n_tokens"].sum()
    assert kept_tokens <= 200, f"{cls.__name__}: token budget exceeded ({kept_tokens} > 200)"
    # ---- determinism and row-order invariance
    a = sel.select(table, feats, 12, seed=seed, targets=targets).frame
    b = sel.select(table, feats, 12, seed=seed, targets=targets).frame
    assert a.equals(b), f"{cls.__name__}: the same seed gave different results"
    perm = np.random.default_rng(seed + 7).permutation(n)
    shuffled = table[perm.tolist()]
    c = sel.select(shuffled, feats, 12, seed=seed, targets=targets[::-1]).frame
    _check_frame(cls, c, shuffled, 12)
    assert c["uid"].to_list() == shuffled["uid"].to_list(), f"{cls.__name__}: frame not in the input row order"
    key = ["uid", "keep", "rank", "reason"]
    assert a.sort("uid").select(key).equals(c.sort("uid").select(key)), f"{cls.__name__}: not row-order invariant"
    sa, sc = a.sort("uid")["score"].to_numpy(), c.sort("uid")["score"].to_numpy()
    assert np.allclose(sa, sc, rtol=1e-9, atol=1e-12, equal_nan=True), f"{cls.__name__}: scores depend on row order"
    # ---- budget above the pool
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sel.select(table, feats, n + 5, seed=seed, targets=targets)
    if sel.fills_budget():
        assert res.n_kept == n, f"{cls.__name__}: budget above the pool kept {res.n_kept} of {n}"
    assert any("exceeds the pool" in str(w.message) for w in caught), f"{cls.__name__}: no warning for budget > pool"


def _check_frame(cls: type, frame: pl.DataFrame, table: pl.DataFrame, limit: int) -> None:
    name = cls.__name__
    for col, dtype in (("uid", pl.Utf8), ("score", pl.Float64), ("keep", pl.Boolean), ("rank", pl.Int64),
                       ("reason", pl.Utf8)):
        assert col in frame.columns, f"{name}: Selection.frame lacks '{col}'"
        assert frame.schema[col] == dtype, f"{name}: '{col}' is {frame.schema[col]}, expected {dtype}"
    assert frame.height == table.height, f"{name}: {frame.height} rows for a pool of {table.height}"
    assert frame["uid"].n_unique() == table.height and set(frame["uid"]) == set(table["uid"]), (
        f"{name}: not every candidate exactly once")
    k = int(frame["keep"].sum())
    assert k <= limit, f"{name}: kept {k} rows over a budget of {limit}"
    ranks = sorted(frame.filter(pl.col("keep"))["rank"].to_list())
    assert ranks == list(range(1, k + 1)), f"{name}: kept ranks are not 1..{k}"
    assert frame.filter(~pl.col("keep"))["rank"].null_count() == table.height - k, f"{name}: dropped rows have a rank"
    score = frame["score"].to_numpy()
    assert not np.isnan(score).any(), f"{name}: NaN scores"
    assert np.isfinite(frame.filter(pl.col("keep"))["score"].to_numpy()).all(), f"{name}: non-finite kept scores"
    assert (frame["reason"].str.len_chars() > 0).all(), f"{name}: empty reasons"


# --------------------------------------------------------------------------- planted problems
def bids_blocks(sizes: tuple[int, ...], targets_per_task: int, scales: tuple[float, ...],
                offsets: tuple[float, ...], noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block influence matrix (specs/less-bids.md B.10): row i of task t has 1 on task t's columns,
    0 elsewhere, then column block t is mapped to scale_t·A + offset_t, plus Gaussian noise.

    Returns (A (N, M), row task (N,), column task (M,)).
    """
    rng = np.random.default_rng(seed)
    k = len(sizes)
    row_task = np.repeat(np.arange(k), sizes)
    col_task = np.repeat(np.arange(k), targets_per_task)
    a = (row_task[:, None] == col_task[None, :]).astype(np.float64)
    if noise:
        a = a + noise * rng.normal(size=a.shape)
    a = a * np.asarray(scales)[col_task] + np.asarray(offsets)[col_task]
    return a, row_task, col_task


def tarot_modes(seed: int = 0, d: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Planted 3-mode problem (specs/tarot.md §10 test 2).

    Returns (pool (5400, d), pool labels in {0, 1, 2, 3 = distractor}, targets (100, d)).
    """
    rng = np.random.default_rng(seed)
    mu = 4.0 * rng.normal(size=(3, d))
    tgt = np.concatenate([mu[k] + 0.5 * rng.normal(size=(c, d)) for k, c in enumerate((60, 30, 10))])
    pool = [mu[k] + 0.5 * rng.normal(size=(c, d)) for k, c in enumerate((3000, 300, 100))]
    pool.append(3.0 * rng.normal(size=(2000, d)) + 8.0)
    labels = np.repeat(np.arange(4), (3000, 300, 100, 2000))
    return np.concatenate(pool), labels, tgt


def uid_frame(n: int, prefix: str = "u") -> pl.DataFrame:
    """A minimal pool table of ``n`` rows with zero-padded uids (uid order = row order)."""
    return pl.DataFrame({"uid": [f"{prefix}{i:08d}" for i in range(n)]})


def embedding_pool(n_generic: int = 2850, n_task: int = 150, m: int = 32, d: int = 384, signal: int = 24,
                   seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, FeatureSet]]:
    """A planted targeted-selection pool with the spectrum of sentence embeddings.

    ``signal`` directions carry the topics (variance 1; generic rows sit on 40 random topic centres,
    in-domain rows and the ``m`` targets on one task centre with a tighter spread); the other d −
    ``signal`` directions hold small, decaying noise. Full whitening scales every direction to unit
    variance, so the noise outweighs the topics; that is the failure mode TAROT's default avoids.

    Returns:
        (pool table ``uid, domain`` with ``domain`` in {generic, task}, target table ``uid, task``,
        roles ``{"feats", "target_feats"}``).
    """
    rng = np.random.default_rng(seed)
    scales = np.concatenate([np.full(signal, 1.0), 0.25 * np.linspace(1.0, 0.2, d - signal)])
    topics = rng.normal(size=(40, signal))
    centre = 1.2 * rng.normal(size=signal)

    def rows(n: int, task: bool) -> np.ndarray:
        x = rng.normal(size=(n, d)) * scales
        if task:
            x[:, :signal] = 0.6 * x[:, :signal] + centre
        else:
            x[:, :signal] += topics[rng.integers(0, len(topics), n)]
        return x

    pool = np.vstack([rows(n_generic, False), rows(n_task, True)])
    tgt = rows(m, True)
    uids = np.array([f"p{i:06d}" for i in range(len(pool))], dtype=object)
    tuids = np.array([f"t{i:04d}" for i in range(m)], dtype=object)
    table = pl.DataFrame({"uid": uids.tolist(), "domain": ["generic"] * n_generic + ["task"] * n_task})
    targets = pl.DataFrame({"uid": tuids.tolist(), "task": ["task"] * m})
    return table, targets, {"feats": FeatureSet("pool", uids, pool), "target_feats": FeatureSet("targets", tuids, tgt)}
