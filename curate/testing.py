"""Toy corpora with planted answers and the selector contract: one named check per property
(:data:`SELECTOR_CHECKS`, :func:`selector_checks`) and :func:`check_selector`, which runs them all."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.errors import MissingFeatureError, ParameterError
from curate.io.store import FeatureSet
from curate.schema import make_record, to_frame
from curate.selectors.base import Budget, Selection

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


# --------------------------------------------------------------------------- the selector contract
# One named check per property (docs/architecture.md "Contracts"), scikit-learn style: each check builds the
# selector from ``params`` (``None``: the class's contract parameters, see resolve_contract_params),
# runs it on the toy pool of ``n`` rows and raises AssertionError naming the class and the property.


def resolve_contract_params(cls: type, folder: str | Path | None = None, *, n: int = 60,
                            seed: int = 0) -> dict[str, Any]:
    """The constructor arguments the contract checks use for ``cls``: its ``contract_params``.

    ``contract_params`` is a dict ClassVar (``{}`` on :class:`~curate.selectors.base.BaseSelector`),
    or a classmethod ``contract_params(folder: Path, table: pl.DataFrame) -> dict`` for parameters
    that need files: it may write them (e.g. judged pairs) into ``folder`` (a new temporary folder
    when None); ``table`` is the toy pool the checks use. A class without the attribute gets ``{}``.
    """
    spec = getattr(cls, "contract_params", None)
    if spec is None:
        return {}
    if callable(spec):
        if folder is None:
            folder = tempfile.mkdtemp(prefix=f"check_{getattr(cls, 'name', 'selector')}_")
        return dict(spec(Path(folder), toy_table(n, seed)))
    return dict(spec)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """A selector built for the checks, with its toy pool, features and targets."""

    who: str
    sel: Any
    table: pl.DataFrame
    feats: dict[str, FeatureSet]
    targets: pl.DataFrame
    n: int
    seed: int

    def select(self, budget: Any) -> Selection:
        return self.sel.select(self.table, self.feats, budget, seed=self.seed, targets=self.targets)

    def select_shuffled(self, budget: Any) -> tuple[pl.DataFrame, Selection]:
        """The pool with its rows permuted (and the targets reversed), and the selection from it."""
        perm = np.random.default_rng(self.seed + 7).permutation(self.n)
        shuffled = self.table[perm.tolist()]
        return shuffled, self.sel.select(shuffled, self.feats, budget, seed=self.seed, targets=self.targets[::-1])


def _setup(cls: type, params: dict[str, Any] | None, n: int, seed: int) -> _Setup:
    params = resolve_contract_params(cls, n=n, seed=seed) if params is None else dict(params)
    sel = cls(**params)
    table, feats, targets = toy_inputs(sel, n=n, seed=seed)
    return _Setup(cls.__name__, sel, table, feats, targets, n, seed)


@dataclasses.dataclass(frozen=True)
class _Run:
    """One selection the frame checks read: what was asked, the frame, the pool as passed, the most
    rows the budget allows and the token budget (None unless the budget is in tokens)."""

    what: str
    frame: pl.DataFrame
    table: pl.DataFrame
    limit: int
    tokens: float | None = None


def _frame_runs(s: _Setup) -> Iterator[_Run]:
    """Budgets 7, 0.25, {"n": 1} and {"tokens": 200}, then 12 on the shuffled pool."""
    for budget, limit in ((7, 7), (0.25, int(0.25 * s.n)), ({"n": 1}, 1)):
        yield _Run(f"budget {budget!r}", s.select(budget).frame, s.table, limit)
    yield _Run("budget {'tokens': 200}", s.select({"tokens": 200}).frame, s.table, s.n, tokens=200)
    shuffled, res = s.select_shuffled(12)
    yield _Run("budget 12 on shuffled rows", res.frame, shuffled, 12)


_FRAME_COLUMNS = (("uid", pl.Utf8), ("score", pl.Float64), ("keep", pl.Boolean), ("rank", pl.Int64),
                  ("reason", pl.Utf8))


def _has_columns(who: str, run: _Run, *cols: str) -> None:
    for col in cols:
        assert col in run.frame.columns, f"{who}: Selection.frame lacks '{col}' ({run.what})"


def check_parameter_validation(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """Every constructor parameter rejects a nonsense value, and the class's ``invalid_examples``,
    with a ParameterError in the one template ("The 'p' parameter of X must be ... Got ...")."""
    params = resolve_contract_params(cls, n=n, seed=seed) if params is None else dict(params)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        bad_values = [_Garbage()] + [v for k, v in getattr(cls, "invalid_examples", ()) if k == f.name]
        for bad in bad_values:
            try:
                cls(**{**params, f.name: bad})
            except ParameterError as exc:
                msg = str(exc)
                assert msg.startswith(f"The '{f.name}' parameter of ") and " must be " in msg and "Got " in msg, (
                    f"{cls.__name__}: parameter '{f.name}' error does not follow the template: {msg}")
            else:
                raise AssertionError(f"{cls.__name__}: parameter '{f.name}' accepted the invalid value {bad!r}")


def check_missing_features(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """Leaving out any required feature role raises MissingFeatureError."""
    s = _setup(cls, params, n, seed)
    for role in s.sel.required_features():
        less = {k: v for k, v in s.feats.items() if k != role}
        _expect_missing(s, less, seed, f"missing feature role '{role}'")


def check_missing_feature_uids(cls: type, params: dict[str, Any] | None = None, *, n: int = 60,
                               seed: int = 0) -> None:
    """A pool feature set that lacks one pool uid raises MissingFeatureError."""
    s = _setup(cls, params, n, seed)
    if not s.feats:
        return
    role = next(r for r in s.sel.required_features() if not r.startswith("target_"))
    fs = s.feats[role]
    cut = {**s.feats, role: FeatureSet(fs.name, fs.uids[1:], np.asarray(fs.values)[1:], dict(fs.meta))}
    _expect_missing(s, cut, seed, f"a uid missing from '{role}'")


def _expect_missing(s: Any, feats: dict[str, FeatureSet], seed: int, what: str) -> None:
    """Selecting with ``feats`` must raise MissingFeatureError."""
    try:
        s.sel.select(s.table, feats, 10, seed=seed, targets=s.targets)
    except MissingFeatureError:
        return
    raise AssertionError(f"{s.who}: {what} did not raise MissingFeatureError")


def check_frame_schema(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """Selection.frame has ``uid`` str, ``score`` f64, ``keep`` bool, ``rank`` i64, ``reason`` str and
    one row per candidate (budgets in rows, fraction, tokens, and on shuffled rows)."""
    s = _setup(cls, params, n, seed)
    for run in _frame_runs(s):
        for col, dtype in _FRAME_COLUMNS:
            _has_columns(s.who, run, col)
            assert run.frame.schema[col] == dtype, (
                f"{s.who}: '{col}' is {run.frame.schema[col]}, expected {dtype} ({run.what})")
        assert run.frame.height == run.table.height, (
            f"{s.who}: {run.frame.height} rows for a pool of {run.table.height} ({run.what})")


def check_every_row_once(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """Every candidate uid appears in the frame exactly once."""
    s = _setup(cls, params, n, seed)
    for run in _frame_runs(s):
        _has_columns(s.who, run, "uid")
        uids = run.frame["uid"]
        assert uids.n_unique() == run.table.height and set(uids) == set(run.table["uid"]), (
            f"{s.who}: not every candidate exactly once ({run.what})")


def check_budget_respected(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """No budget (n, fraction, {"n": 1}, tokens, on shuffled rows) keeps more than it allows; kept
    rows fit a token budget."""
    s = _setup(cls, params, n, seed)
    for run in _frame_runs(s):
        _has_columns(s.who, run, "uid", "keep")
        k = int(run.frame["keep"].sum())
        assert k <= run.limit, f"{s.who}: kept {k} rows over a budget of {run.limit} ({run.what})"
        if run.tokens is not None:
            kept = run.frame.join(run.table.select("uid", "n_tokens"), on="uid").filter(pl.col("keep"))
            kept_tokens = kept["n_tokens"].sum()
            assert kept_tokens <= run.tokens, f"{s.who}: token budget exceeded ({kept_tokens} > {run.tokens:g})"


def check_budget_filled(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """A selector whose ``fills_budget()`` is True keeps exactly the budget's rows (n and fraction)."""
    s = _setup(cls, params, n, seed)
    if not s.sel.fills_budget():
        return
    for budget in (7, 0.25):
        res = s.select(budget)
        want = Budget.parse(budget).rows(n)
        assert res.n_kept == want, f"{s.who}: kept {res.n_kept} rows for a budget of {want}"


def check_ranks(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """``rank`` is 1..k on the k kept rows and null on dropped rows."""
    s = _setup(cls, params, n, seed)
    for run in _frame_runs(s):
        _has_columns(s.who, run, "keep", "rank")
        k = int(run.frame["keep"].sum())
        ranks = sorted(run.frame.filter(pl.col("keep"))["rank"].to_list())
        assert ranks == list(range(1, k + 1)), f"{s.who}: kept ranks are not 1..{k} ({run.what})"
        assert run.frame.filter(~pl.col("keep"))["rank"].null_count() == run.table.height - k, (
            f"{s.who}: dropped rows have a rank ({run.what})")


def check_finite_scores(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """No NaN score anywhere, and finite scores on kept rows (-inf may mark unscored dropped rows)."""
    s = _setup(cls, params, n, seed)
    for run in _frame_runs(s):
        _has_columns(s.who, run, "keep", "score")
        assert not np.isnan(run.frame["score"].to_numpy()).any(), f"{s.who}: NaN scores ({run.what})"
        assert np.isfinite(run.frame.filter(pl.col("keep"))["score"].to_numpy()).all(), (
            f"{s.who}: non-finite kept scores ({run.what})")


def check_reasons(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """Every row has a non-empty ``reason``."""
    s = _setup(cls, params, n, seed)
    for run in _frame_runs(s):
        _has_columns(s.who, run, "reason")
        assert (run.frame["reason"].str.len_chars() > 0).all(), f"{s.who}: empty reasons ({run.what})"


def check_seed_deterministic(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """The same seed gives identical frames."""
    s = _setup(cls, params, n, seed)
    a, b = s.select(12).frame, s.select(12).frame
    assert a.equals(b), f"{s.who}: the same seed gave different results"


def check_row_order_invariant(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """Shuffling the pool rows (and reversing the targets) gives the frame in the input row order and
    the same selection: equal uid, keep, rank, reason and scores (to 1e-9)."""
    s = _setup(cls, params, n, seed)
    a = s.select(12).frame
    shuffled, res = s.select_shuffled(12)
    c = res.frame
    assert c["uid"].to_list() == shuffled["uid"].to_list(), f"{s.who}: frame not in the input row order"
    key = ["uid", "keep", "rank", "reason"]
    assert a.sort("uid").select(key).equals(c.sort("uid").select(key)), f"{s.who}: not row-order invariant"
    sa, sc = a.sort("uid")["score"].to_numpy(), c.sort("uid")["score"].to_numpy()
    assert np.allclose(sa, sc, rtol=1e-9, atol=1e-12, equal_nan=True), f"{s.who}: scores depend on row order"


def check_budget_above_pool(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """A budget above the pool warns ("exceeds the pool") and, when ``fills_budget()``, keeps every row."""
    s = _setup(cls, params, n, seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = s.select(n + 5)
    if s.sel.fills_budget():
        assert res.n_kept == n, f"{s.who}: budget above the pool kept {res.n_kept} of {n}"
    assert any("exceeds the pool" in str(w.message) for w in caught), f"{s.who}: no warning for budget > pool"


#: The contract, in the order :func:`check_selector` runs it.
SELECTOR_CHECKS: tuple[Callable[..., None], ...] = (
    check_parameter_validation,
    check_missing_features,
    check_missing_feature_uids,
    check_frame_schema,
    check_every_row_once,
    check_budget_respected,
    check_budget_filled,
    check_ranks,
    check_finite_scores,
    check_reasons,
    check_seed_deterministic,
    check_row_order_invariant,
    check_budget_above_pool,
)


def selector_checks(cls: type, params: dict[str, Any] | None = None, *, n: int = 60,
                    seed: int = 0) -> Iterator[tuple[str, Callable[[], None]]]:
    """``(check name, check)`` for every check of the contract, each bound to ``cls`` and ``params``.

    For one test per property, e.g. ``@pytest.mark.parametrize`` over (selector, check name)::

        params = resolve_contract_params(cls, tmp_path)
        dict(selector_checks(cls, params))["check_row_order_invariant"]()
    """
    for check in SELECTOR_CHECKS:
        yield check.__name__, functools.partial(check, cls, params, n=n, seed=seed)


def check_selector(cls: type, params: dict[str, Any] | None = None, *, n: int = 60, seed: int = 0) -> None:
    """Run every check of the selector contract (docs/architecture.md "Contracts") on ``cls``; see
    :data:`SELECTOR_CHECKS`.

    Checks: every parameter is validated with the one error template (a nonsense value, plus the
    class's ``invalid_examples``); missing features raise :class:`MissingFeatureError`; one row per
    candidate, each once; the budget (n, fraction, tokens) is respected; rank is 1..k on kept rows;
    finite scores on kept rows and no NaN anywhere; non-empty reasons; same seed gives identical
    frames; shuffling the rows gives the same selection; a budget above the pool warns and keeps
    every row. Raises AssertionError prefixed with the name of the first failing check.

    ``params`` are the constructor arguments to use, as given; when None, the class's
    ``contract_params`` supply them (see :func:`resolve_contract_params`).
    """
    if params is None:
        params = resolve_contract_params(cls, n=n, seed=seed)
    for name, check in selector_checks(cls, params, n=n, seed=seed):
        try:
            check()
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


# --------------------------------------------------------------------------- planted problems
def bids_blocks(sizes: tuple[int, ...], targets_per_task: int, scales: tuple[float, ...],
                offsets: tuple[float, ...], noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block influence matrix (docs/methods/less-bids.md B.10): row i of task t has 1 on task t's columns,
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
    """Planted 3-mode problem (docs/methods/tarot.md §10 test 2).

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
