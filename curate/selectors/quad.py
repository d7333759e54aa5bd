"""Quad: quality and diversity by a UCB bandit over embedding clusters, rewarded by EK-FAC influence.

Zhang et al., "Harnessing Diversity for Important Data Selection in Pretraining Large Language
Models", ICLR 2025, arXiv 2409.16986; see ``docs/methods/quad.md``. Written from the paper and that
note; nothing of the released reference code is ported (it inverts nothing in its EK-FAC step, mixes
coordinate systems and probes other documents than it accepts, docs/methods/quad.md §2.3).

Pipeline (docs/methods/quad.md §3):

1. **Clusters.** Embeddings are L2-normalised and clustered with spherical faiss k-means
   (:func:`cluster_rows`); labels are renumbered by the smallest uid they contain, so they do not
   depend on faiss's internal centroid order. D[k, l] = 1 − ĉ_k·ĉ_l between unit centroids.
2. **Chunks.** Each cluster's rows are put in a seeded order and cut into chunks of ``chunk_size``
   rows (:func:`make_chunks`); a chunk is the unit of acceptance.
3. **Reward.** A pluggable oracle ``reward_fn(uids) -> ρ`` (tests inject synthetic ones). The default
   oracle, :class:`curate.influence.quad_reward.InfluenceReward`, is cos(G_z, P(V)) with V = Σ_r ∇ℓ(r)
   the summed target-loss gradient over the tracked modules and P the damped EK-FAC inverse fitted
   on a seeded **pool** sample, cached on disk (``reward="influence"`` gives the raw ⟨P(V), G_z⟩).
4. **Bandit** (:func:`run_bandit`): pull reward r = mean ρ(probe) − τ over ``probe_size`` rows drawn
   from the chunk being considered; r > 0 accepts the whole chunk; neighbour credit
   score[j] += r·(1 − D[k, j]/γ), cnt[j] += 1 for D[k, j] < γ; UCB[j] = score/cnt +
   α·√(2 ln N_tot / (cnt + 1)); exhausted arms get −∞; ``arms_per_round`` arms per round.

The bandit itself is :mod:`curate.selectors.quad_bandit`.

Deviations (all deliberate, see docs/methods/quad.md §3-§5): small-pool defaults for K, chunk size,
probe size, arms per round and the calibration sample; cost defaults (MLP factors of every block
fitted on 32 pool rows and cached; docs/methods/quad.md §5); scale-free ``tau="auto"`` /
``alpha="auto"`` from a calibration sample; no random projection (exact factored cosine; the paper
projects to 8192 dimensions) — ``d`` is not implemented; a row evaluated twice (calibration and a
later probe) is evaluated once and counted once; the run stops in the middle of a round as soon as the budget is filled (the reference code
finishes the round); ``fill="ucb"`` tops an under-filled selection up with unpulled chunks of the
clusters with the highest estimated mean, then with rejected chunks, so it always fills the budget.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate.errors import MissingFeatureError, param_error
from curate.influence.quad_reward import InfluenceReward
from curate.selectors.base import (
    BaseSelector,
    Choice,
    SelectContext,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str,
)
from curate.selectors.quad_bandit import (
    S_CHUNKS,
    S_TARGETS,
    BanditProgress,
    BanditResult,
    auto_tau_alpha,
    run_bandit,
    ucb_values,
)

KEPT = "kept_accepted_chunk"
TRIM = "budget_trim"
REJECTED = "chunk_rejected"
NOT_PULLED = "chunk_not_pulled"
NEVER = "cluster_never_pulled"
FILLED = "filled_by_ucb"

#: cost defaults of the influence reward (docs/methods/quad.md §5)
DEFAULT_LAYERS, DEFAULT_FIT_EXAMPLES = None, 32

RewardFn = Callable[[Sequence[str]], np.ndarray]

__all__ = ["InfluenceReward", "QuadSelector", "auto_tau_alpha", "cluster_rows", "make_chunks", "relabel_by_first",
           "run_bandit", "ucb_values"]


# ----------------------------------------------------------------------------------- defaults
def default_n_clusters(n: int) -> int:
    """K = clamp(round(√N / 2), 2, 10,000), at most N (docs/methods/quad.md §4)."""
    return max(1, min(n, max(2, min(10_000, int(round(math.sqrt(n) / 2))))))


def default_chunk_size(n: int, k: int) -> int:
    """c = max(1, round(N / (4K)))."""
    return max(1, int(round(n / (4 * max(k, 1)))))


def default_probe_size(c: int) -> int:
    """m = clamp(⌈c/10⌉, 2, 10)."""
    return min(10, max(2, math.ceil(c / 10)))


def default_arms(k: int) -> int:
    """A = clamp(⌈K/10⌉, 1, 50)."""
    return min(50, max(1, math.ceil(k / 10)))


def default_calibration(n: int) -> int:
    """n_cal = clamp(⌈N/10⌉, 16, 64): τ's standard error stays well below that of an m-row probe mean
    while a small pool does not spend a fifth of its rows on calibration."""
    return min(64, max(16, math.ceil(n / 10)))


# ----------------------------------------------------------------------------------- clusters
def relabel_by_first(assign: np.ndarray) -> np.ndarray:
    """Renumber cluster ids 0..K'-1 in order of their first (smallest-index) member; empty ids vanish.

    In canonical order (rows sorted by uid) this is "in order of the smallest uid", so labels do not
    depend on the order in which faiss returns its centroids.
    """
    assign = np.asarray(assign, dtype=np.int64)
    _, first = np.unique(assign, return_index=True)
    old_in_order = assign[np.sort(first)]
    lut = {int(o): i for i, o in enumerate(old_in_order)}
    return np.fromiter((lut[int(a)] for a in assign), dtype=np.int64, count=len(assign))


def centroid_distances(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit centroids (K, d), D = 1 − ĉĉᵀ (K, K), exact 0 on the diagonal, clipped at 0)."""
    x = np.asarray(emb, dtype=np.float64)
    k = int(labels.max()) + 1 if len(labels) else 0
    cent = np.zeros((k, x.shape[1]))
    np.add.at(cent, labels, x)
    cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    dist = np.clip(1.0 - cent @ cent.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    return cent, dist


def cluster_rows(emb: np.ndarray, n_clusters: int, *, seed: int = 0, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Spherical faiss k-means of L2-normalised rows (docs/methods/quad.md §3.1).

    Returns:
        (labels (N,) renumbered by first member, centroid distance matrix D (K', K')).
    """
    from curate.features.index import kmeans

    x = np.asarray(emb, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(int(n_clusters), len(x))
    if k <= 1:
        labels = np.zeros(len(x), dtype=np.int64)
    else:
        _, assign = kmeans(x.astype(np.float32), k, seed=seed, niter=niter, spherical=True, device="cpu")
        labels = relabel_by_first(assign)
    return labels, centroid_distances(x, labels)[1]


def make_chunks(labels: np.ndarray, chunk_size: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """Per cluster, its row indices in a seeded order cut into consecutive chunks of ``chunk_size``."""
    out: list[list[np.ndarray]] = []
    for k in range(int(labels.max()) + 1 if len(labels) else 0):
        rows = np.flatnonzero(labels == k)
        rows = rows[rng.permutation(len(rows))]
        out.append([rows[s : s + chunk_size] for s in range(0, len(rows), chunk_size)])
    return out


# ----------------------------------------------------------------------------------- selector
def contract_reward(uids: Sequence[str]) -> np.ndarray:
    """A deterministic reward in [0, 1) from a hash of each uid (the contract checks' oracle)."""
    import hashlib

    return np.array([int(hashlib.md5(str(u).encode()).hexdigest()[:6], 16) / 2**24 for u in uids])


def _auto_or_float(owner: str, name: str, value: Any, lo: float | None = None) -> None:
    if isinstance(value, str) and value == "auto":
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or (lo is not None and value < lo):
        rule = "'auto' or a finite number" + (f" >= {lo}" if lo is not None else "")
        raise param_error(owner, name, rule, value)


@dataclass(frozen=True, kw_only=True)
class QuadSelector(BaseSelector):
    """Quad: UCB bandit over embedding clusters rewarded by EK-FAC influence (arXiv 2409.16986).

    Role ``embed`` (pool embeddings, e.g. MiniLM); a target table (the reference set) unless a
    ``reward_fn`` is injected. Parameters ``None`` / ``"auto"`` take the small-pool defaults of
    docs/methods/quad.md §4 (K = √N/2, c = N/4K, m = ⌈c/10⌉, A = ⌈K/10⌉, τ = mean and α = 0.025·std of a
    calibration sample of clamp(⌈N/10⌉, 16, 64) rows). ``factors`` is a folder written by ``curate
    influence fit``; else EK-FAC is fitted on ``fit_examples`` pool rows over ``modules`` of the last
    ``layers`` blocks and cached (``cache_factors``). What each cost knob trades: docs/methods/quad.md
    §5. ``progress`` (None: when stderr is a terminal) shows the fit, target and bandit stages.
    """

    name: ClassVar[str] = "quad"
    requires: ClassVar[tuple[str, ...]] = ("embed",)
    default_features: ClassVar[dict[str, str]] = {"embed": "embed/prompt+response"}
    n_clusters: int | None = None
    chunk_size: int | None = None
    probe_size: int | None = None
    arms_per_round: int | None = None
    alpha: float | str = "auto"
    tau: float | str = "auto"
    gamma: float = 0.2
    max_rounds: int = 200
    max_probe_evals: int | None = None
    n_calibration: int | None = None
    init: str = "random"
    fill: str = "none"
    kmeans_niter: int = 20
    reward: str = "cosine"
    reference_agg: str = "sum"
    path_params: ClassVar[tuple[str, ...]] = ("factors",)
    path_or_name_params: ClassVar[tuple[str, ...]] = ("model",)
    model: str = "default"
    modules: str = "mlp"
    layers: int | None = DEFAULT_LAYERS
    factors: str | None = None
    fit_examples: int = DEFAULT_FIT_EXAMPLES
    cache_factors: bool = True
    damping: float | str = "heuristic"
    max_length: int = 256
    batch_size: int = 8
    max_targets: int | None = 64
    device: str = "auto"
    progress: bool | None = None
    reward_fn: Any = None
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("n_clusters", 0), ("chunk_size", 0), ("probe_size", 0), ("arms_per_round", 0), ("alpha", -1.0),
        ("alpha", "big"), ("tau", float("nan")), ("gamma", 0.0), ("max_rounds", 0), ("max_probe_evals", 0),
        ("n_calibration", 1), ("init", "first"), ("fill", "all"), ("reward", "dot"), ("damping", -1.0),
        ("max_length", 1), ("batch_size", 0), ("max_targets", 0), ("fit_examples", 0), ("layers", 0),
        ("cache_factors", "yes"), ("progress", "loud"),
    )
    #: the default reward loads a causal LM; the contract is about the bandit and the frame
    contract_params: ClassVar[dict[str, Any]] = {"reward_fn": contract_reward}

    def __post_init__(self) -> None:
        o = "Quad"
        check_int(o, "n_clusters", self.n_clusters, 1, allow_none=True)
        check_int(o, "chunk_size", self.chunk_size, 1, allow_none=True)
        check_int(o, "probe_size", self.probe_size, 1, allow_none=True)
        check_int(o, "arms_per_round", self.arms_per_round, 1, allow_none=True)
        _auto_or_float(o, "alpha", self.alpha, 0.0)
        _auto_or_float(o, "tau", self.tau)
        check_float(o, "gamma", self.gamma, 0.0, lo_open=True)
        check_int(o, "max_rounds", self.max_rounds, 1)
        check_int(o, "max_probe_evals", self.max_probe_evals, 1, allow_none=True)
        check_int(o, "n_calibration", self.n_calibration, 2, allow_none=True)
        check_choice(o, "init", self.init, ("random", "index_order"))
        check_choice(o, "fill", self.fill, ("none", "ucb"))
        check_int(o, "kmeans_niter", self.kmeans_niter, 1)
        check_choice(o, "reward", self.reward, ("cosine", "influence"))
        check_choice(o, "reference_agg", self.reference_agg, ("sum", "mean_of_normalized"))
        check_str(o, "model", self.model)
        check_str(o, "modules", self.modules)
        check_int(o, "layers", self.layers, 1, allow_none=True)
        check_str(o, "factors", self.factors, allow_none=True)
        check_int(o, "fit_examples", self.fit_examples, 1)
        check_bool(o, "cache_factors", self.cache_factors)
        if not (self.damping == "heuristic" if isinstance(self.damping, str) else False):
            check_float(o, "damping", self.damping, 0.0)
        check_int(o, "max_length", self.max_length, 8)
        check_int(o, "batch_size", self.batch_size, 1)
        check_int(o, "max_targets", self.max_targets, 1, allow_none=True)
        check_choice(o, "device", self.device, ("auto", "cpu", "cuda"))
        if self.progress is not None:
            check_bool(o, "progress", self.progress)
        if self.reward_fn is not None and not callable(self.reward_fn):
            raise param_error(o, "reward_fn", "a callable uids -> rewards or None", self.reward_fn)

    def fills_budget(self) -> bool:
        return self.fill == "ucb"

    def params(self) -> dict[str, Any]:
        out = super().params()
        if out["reward_fn"] is not None:
            out["reward_fn"] = f"<injected {type(out['reward_fn']).__name__}>"
        return out

    def _progress_on(self) -> bool:
        return sys.stderr.isatty() if self.progress is None else self.progress

    # ------------------------------------------------------------------ the oracle
    def _oracle(self, ctx: SelectContext) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
        uids = ctx.uids
        if self.reward_fn is not None:
            fn = self.reward_fn
            return (lambda idx: np.asarray(fn([uids[i] for i in idx]), dtype=np.float64)), {}
        if ctx.targets is None or ctx.targets.height == 0:
            raise MissingFeatureError("selector 'quad' needs a target table (recipe 'targets' / --target) for its "
                                      "influence rewards, or an injected reward_fn.")
        from curate.features.lm import load_causal_lm, resolve_device

        targets = ctx.targets
        if self.max_targets is not None and targets.height > self.max_targets:
            pick = np.sort(np.random.default_rng([ctx.seed, S_TARGETS]).choice(targets.height, self.max_targets,
                                                                                 replace=False))
            targets = targets[pick.tolist()]
        lm, tok = load_causal_lm(self.model, device=resolve_device(self.device))
        oracle = InfluenceReward(lm, tok, ctx.table, targets, modules=self.modules, layers=self.layers,
                                 factors=self.factors, fit_examples=self.fit_examples, damping=self.damping,
                                 reward=self.reward, reference_agg=self.reference_agg, max_length=self.max_length,
                                 batch_size=self.batch_size, seed=ctx.seed, cache=self.cache_factors,
                                 progress=self._progress_on())
        facts = {"factors": oracle.factors_source, "n_tracked_modules": len(oracle.curv.names),
                 "n_fit": int(oracle.curv.n_seq), "n_targets": oracle.n_targets}
        return oracle.rows, facts

    # ------------------------------------------------------------------ choose
    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        n = ctx.n
        emb = np.asarray(ctx.features["embed"], dtype=np.float64).reshape(n, -1)
        kk = self.n_clusters if self.n_clusters is not None else default_n_clusters(n)
        labels, dist = cluster_rows(emb, min(kk, n), seed=ctx.seed, niter=self.kmeans_niter)
        n_cl = len(dist)
        c = self.chunk_size if self.chunk_size is not None else default_chunk_size(n, n_cl)
        m = self.probe_size if self.probe_size is not None else default_probe_size(c)
        arms = self.arms_per_round if self.arms_per_round is not None else default_arms(n_cl)
        if n_cl > 1:
            med = float(np.median((dist < self.gamma).sum(1) - 1))
            if med == 0 or med > n_cl / 4:
                warnings.warn(f"quad: the median cluster has {med:g} neighbours within gamma={self.gamma} "
                              f"(of {n_cl} clusters); neighbour credit is {'off' if med == 0 else 'very broad'}.",
                              stacklevel=3)
        chunks = make_chunks(labels, c, np.random.default_rng([ctx.seed, S_CHUNKS]))
        n_cal = self.n_calibration if self.n_calibration is not None else default_calibration(n)
        oracle, facts = self._oracle(ctx)
        bar = BanditProgress(self._progress_on(), k)
        try:
            res = run_bandit(chunks, dist, oracle, budget=k, alpha=self.alpha, tau=self.tau, gamma=self.gamma,
                             probe_size=m, arms_per_round=arms, max_rounds=self.max_rounds,
                             max_probe_evals=self.max_probe_evals, init=self.init, n_calibration=n_cal, n_rows=n,
                             seed=ctx.seed, on_event=bar)
        finally:
            bar.close()
        reasons = np.full(n, NEVER, dtype=object)
        chunk_of = np.full(n, -1, dtype=np.int64)
        round_of: list[int | None] = [None] * n
        for a, cl in enumerate(chunks):
            for ci, rows in enumerate(cl):
                chunk_of[rows] = ci
                st = res.chunk_state[a][ci]
                if res.pulls[a] > 0:
                    reasons[rows] = KEPT if st == "accepted" else REJECTED if st == "rejected" else NOT_PULLED
                if res.chunk_round[a][ci] >= 0:
                    for i in rows:
                        round_of[int(i)] = res.chunk_round[a][ci]
        reasons[res.trimmed] = TRIM
        order = res.order
        if len(order) < k:
            order = self._fill(res, chunks, order, k, reasons)
        mean = res.mean_reward
        score = mean[labels]
        probe: list[float | None] = [None] * n
        for i, v in res.probe_reward.items():
            probe[i] = v
        per_cluster = [{"cluster": j, "size": int((labels == j).sum()), "chunks": len(chunks[j]),
                        "pulls": int(res.pulls[j]), "accepted": sum(1 for s in res.chunk_state[j] if s == "accepted"),
                        "mean_reward": float(mean[j]), "credits": float(res.cnt[j])} for j in range(n_cl)]
        diag = {
            "n_evaluations": res.n_evaluations, "evaluation_fraction": res.n_evaluations / max(n, 1),
            "n_calibration": res.extra["n_calibration"], "rounds": res.rounds, "stop": res.stop,
            "n_clusters": n_cl, "clusters_touched": int((res.pulls > 0).sum()), "chunk_size": c, "probe_size": m,
            "arms_per_round": arms, "tau": res.tau, "alpha": res.alpha, "gamma": self.gamma,
            "n_accepted_chunks": len(res.accepted), "n_pulls": int(res.pulls.sum()),
            "n_kept_before_fill": len(res.order), "per_cluster": per_cluster, "ucb_trace": res.trace, **facts,
        }
        if len(order) < k:
            warnings.warn(f"quad: selected {len(order)} rows for a budget of {k} ({res.stop}); fill='ucb' completes "
                          "the selection.", stacklevel=3)
        extra = {"probe_reward": pl.Series("probe_reward", probe, dtype=pl.Float64),
                 "cluster": labels, "chunk": chunk_of, "round": pl.Series("round", round_of, dtype=pl.Int64)}
        return Choice(order=np.asarray(order, dtype=np.int64), score=score, reasons=reasons, extra=extra,
                      diagnostics=diag)

    def _fill(self, res: BanditResult, chunks: list[list[np.ndarray]], order: np.ndarray, k: int,
              reasons: np.ndarray) -> np.ndarray:
        if self.fill != "ucb":
            return order
        mean = res.mean_reward
        ranked = np.lexsort((np.arange(len(chunks)), -mean))
        taken = set(order.tolist())
        extra: list[int] = []
        for wanted in ("", "rejected", "accepted"):  # unpulled chunks, then rejected, then trimmed rows
            for a in ranked:
                for ci, rows in enumerate(chunks[a]):
                    if res.chunk_state[a][ci] != wanted:
                        continue
                    for i in rows:
                        if len(order) + len(extra) >= k:
                            break
                        if int(i) not in taken:
                            extra.append(int(i))
                            taken.add(int(i))
        idx = np.asarray(extra, dtype=np.int64)
        reasons[idx] = FILLED
        return np.concatenate([order, idx]).astype(np.int64)
