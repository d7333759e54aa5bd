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
   oracle, :class:`InfluenceReward`, is cos(G_z, P(V)) with V = Σ_r ∇ℓ(r) the summed target-loss
   gradient over the tracked modules and P the damped EK-FAC inverse fitted on a seeded **pool**
   sample (``reward="influence"`` gives the raw ⟨P(V), G_z⟩). The inner product and ‖G_z‖ are
   computed with the factored per-token formulas, so G_z is never formed.
4. **Bandit** (:func:`run_bandit`): pull reward r = mean ρ(probe) − τ over ``probe_size`` rows drawn
   from the chunk being considered; r > 0 accepts the whole chunk; neighbour credit
   score[j] += r·(1 − D[k, j]/γ), cnt[j] += 1 for D[k, j] < γ; UCB[j] = score/cnt +
   α·√(2 ln N_tot / (cnt + 1)); exhausted arms get −∞; ``arms_per_round`` arms per round.

Deviations (all deliberate, see docs/methods/quad.md §3-§4): small-pool defaults for K, chunk size,
probe size and arms per round; scale-free ``tau="auto"`` / ``alpha="auto"`` from a calibration sample; no random
projection (exact factored cosine; the paper projects to 8192 dimensions) — ``d`` is not
implemented; a row evaluated twice (calibration and a later probe) is evaluated once and counted
once; the run stops in the middle of a round as soon as the budget is filled (the reference code
finishes the round); ``fill="ucb"`` tops an under-filled selection up with unpulled chunks of the
clusters with the highest estimated mean, then with rejected chunks, so it always fills the budget.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import MissingFeatureError, SchemaError, param_error
from curate.selectors.base import (
    BaseSelector,
    Choice,
    SelectContext,
    check_choice,
    check_float,
    check_int,
    check_str,
)

KEPT = "kept_accepted_chunk"
TRIM = "budget_trim"
REJECTED = "chunk_rejected"
NOT_PULLED = "chunk_not_pulled"
NEVER = "cluster_never_pulled"
FILLED = "filled_by_ucb"

# rng streams (np.random.default_rng([seed, stream])) so the stages do not share draws
S_KMEANS, S_CHUNKS, S_CAL, S_INIT, S_PROBE, S_TARGETS = 1, 2, 3, 4, 5, 6

RewardFn = Callable[[Sequence[str]], np.ndarray]


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


# ----------------------------------------------------------------------------------- bandit
@dataclass
class BanditResult:
    """What :func:`run_bandit` did.

    Attributes:
        order: kept row indices in acceptance order (the crossing chunk truncated).
        accepted: (cluster, chunk, round) of every accepted chunk, in pull order.
        chunk_state: per cluster, per chunk: "accepted" | "rejected" | "" (not pulled).
        chunk_round: per cluster, per chunk: the round it was pulled in (-1 if never).
        trimmed: row indices of the crossing chunk beyond the budget.
        probe_reward: row index -> ρ for every evaluated row.
        pulls: (K,) pulls per cluster; score, cnt: the bandit state; n_tot: Σ credits.
        ucb: final UCB (−inf for exhausted arms).
        trace: one dict per round (arms, UCB at selection, rewards, accepted).
        rounds: rounds run; n_evaluations: distinct rows evaluated (calibration included).
        stop: why the run stopped.
    """

    order: np.ndarray
    accepted: list[tuple[int, int, int]]
    chunk_state: list[list[str]]
    chunk_round: list[list[int]]
    trimmed: np.ndarray
    probe_reward: dict[int, float]
    pulls: np.ndarray
    score: np.ndarray
    cnt: np.ndarray
    n_tot: int
    ucb: np.ndarray
    trace: list[dict[str, Any]]
    rounds: int
    n_evaluations: int
    stop: str
    tau: float = 0.0
    alpha: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_reward(self) -> np.ndarray:
        """Estimated mean reward score/cnt per cluster (0 where never credited)."""
        return np.where(self.cnt > 0, self.score / np.maximum(self.cnt, 1), 0.0)


class _Evaluator:
    """Caches ρ per row index and counts distinct evaluations."""

    def __init__(self, reward: Callable[[np.ndarray], np.ndarray]) -> None:
        self.reward = reward
        self.cache: dict[int, float] = {}

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        new = [int(i) for i in idx if int(i) not in self.cache]
        if new:
            vals = np.asarray(self.reward(np.asarray(new, dtype=np.int64)), dtype=np.float64).reshape(-1)
            if vals.shape != (len(new),) or not np.isfinite(vals).all():
                raise SchemaError("Quad's reward oracle returned bad values.", field="reward_fn",
                                  expected=f"{len(new)} finite numbers", found=vals[:5].tolist())
            self.cache.update(zip(new, vals.tolist(), strict=True))
        return np.array([self.cache[int(i)] for i in idx], dtype=np.float64)


def ucb_values(score: np.ndarray, cnt: np.ndarray, n_tot: int, alpha: float, exhausted: np.ndarray) -> np.ndarray:
    """UCB[j] = score/max(cnt,1) + α·√(2 ln max(N_tot,1) / (cnt+1)); −inf where exhausted."""
    mean = score / np.maximum(cnt, 1)
    ucb = mean + alpha * np.sqrt(2.0 * math.log(max(n_tot, 1)) / (cnt + 1.0))
    return np.where(exhausted, -np.inf, ucb)


def auto_tau_alpha(cal: np.ndarray) -> tuple[float, float]:
    """τ = mean(ρ_cal), α = 0.025·std(ρ_cal, ddof=1) (docs/methods/quad.md §3.4; a project choice,
    not the paper's)."""
    cal = np.asarray(cal, dtype=np.float64)
    tau = float(cal.mean()) if len(cal) else 0.0
    alpha = 0.025 * float(cal.std(ddof=1)) if len(cal) > 1 else 0.0
    return tau, alpha


def run_bandit(
    chunks: list[list[np.ndarray]],
    dist: np.ndarray,
    reward: Callable[[np.ndarray], np.ndarray],
    *,
    budget: int,
    alpha: float | str = "auto",
    tau: float | str = "auto",
    gamma: float = 0.2,
    probe_size: int = 10,
    arms_per_round: int = 50,
    max_rounds: int = 200,
    max_probe_evals: int | None = None,
    init: str = "random",
    n_calibration: int = 64,
    n_rows: int | None = None,
    seed: int = 0,
) -> BanditResult:
    """The Quad bandit over clusters (docs/methods/quad.md §3.3-§3.5), independent of where rewards come from.

    Args:
        chunks: per cluster, its chunks of row indices (:func:`make_chunks`).
        dist: (K, K) centroid distances.
        reward: row indices -> ρ per row (the reward oracle).
        budget: rows to accept; the crossing chunk is truncated.
        alpha, tau: floats or ``"auto"`` (calibrated on ``n_calibration`` uniform rows).
        gamma: neighbour-credit distance; probe_size: m; arms_per_round: A.
        max_rounds, max_probe_evals: stopping rules besides the budget and exhausted arms.
        init: ``"random"`` (seeded permutation in round 0) or ``"index_order"`` (labels 0..A−1).
        n_rows: pool size (for the calibration sample; default: the rows in ``chunks``).
        seed: seed of calibration, round-0 order and probes.
    """
    k = len(chunks)
    ev = _Evaluator(reward)
    n_all = n_rows if n_rows is not None else sum(len(c) for cl in chunks for c in cl)
    cal_idx = np.zeros(0, dtype=np.int64)
    if isinstance(tau, str) or isinstance(alpha, str):
        n_cal = min(n_all, n_calibration)
        cal_idx = np.sort(np.random.default_rng([seed, S_CAL]).choice(n_all, size=n_cal, replace=False))
        t_auto, a_auto = auto_tau_alpha(ev(cal_idx))
        tau = t_auto if isinstance(tau, str) else tau
        alpha = a_auto if isinstance(alpha, str) else alpha
    tau, alpha = float(tau), float(alpha)
    neigh = [np.flatnonzero(dist[j] < gamma) for j in range(k)]
    for j in range(k):  # the pulled arm always credits itself, even for gamma -> 0
        if j not in set(neigh[j].tolist()):
            neigh[j] = np.sort(np.append(neigh[j], j))
    weight = [1.0 - dist[j, neigh[j]] / gamma for j in range(k)]
    for j in range(k):
        weight[j][neigh[j] == j] = 1.0
    score, cnt = np.zeros(k), np.zeros(k)
    n_tot = 0
    next_chunk = np.zeros(k, dtype=np.int64)
    n_chunks = np.array([len(c) for c in chunks], dtype=np.int64)
    pulls = np.zeros(k, dtype=np.int64)
    state = [[""] * len(c) for c in chunks]
    rnd = [[-1] * len(c) for c in chunks]
    order: list[np.ndarray] = []
    accepted: list[tuple[int, int, int]] = []
    trimmed = np.zeros(0, dtype=np.int64)
    n_kept = 0
    probe_rng = np.random.default_rng([seed, S_PROBE])
    ucb = ucb_values(score, cnt, n_tot, alpha, next_chunk >= n_chunks)
    trace: list[dict[str, Any]] = []
    stop = "max_rounds"
    rounds = 0
    done = budget <= 0
    if done:
        stop = "budget"
    for r in range(max_rounds if not done else 0):
        exhausted = next_chunk >= n_chunks
        if exhausted.all():
            stop = "no_arm_left"
            break
        n_arms = min(arms_per_round, int((~exhausted).sum()))
        if r == 0:
            perm = np.arange(k) if init == "index_order" else np.random.default_rng([seed, S_INIT]).permutation(k)
            arms = [int(a) for a in perm if not exhausted[a]][:n_arms]
        else:
            labels = np.arange(k)
            cand = np.lexsort((labels, -ucb))
            arms = [int(a) for a in cand if not exhausted[a]][:n_arms]
        rounds = r + 1
        rec: dict[str, Any] = {"round": r, "arms": [], "ucb": [], "reward": [], "accepted": []}
        for a in arms:
            c = int(next_chunk[a])
            rows = chunks[a][c]
            m = min(probe_size, len(rows))
            probe = np.sort(rows[probe_rng.choice(len(rows), size=m, replace=False)])
            n_new = sum(1 for i in probe if int(i) not in ev.cache)
            if max_probe_evals is not None and len(ev.cache) + n_new > max_probe_evals:
                stop = "max_probe_evals"
                done = True
                break
            rew = float(ev(probe).mean() - tau)
            next_chunk[a] += 1
            pulls[a] += 1
            rnd[a][c] = r
            ok = rew > 0
            state[a][c] = "accepted" if ok else "rejected"
            if ok:
                take = rows[: budget - n_kept]
                order.append(take)
                trimmed = rows[len(take) :]
                n_kept += len(take)
                accepted.append((a, c, r))
            nb = neigh[a]
            score[nb] += rew * weight[a]
            cnt[nb] += 1
            n_tot += len(nb)
            rec["arms"].append(a)
            rec["ucb"].append(float(ucb[a]) if r else None)
            rec["reward"].append(rew)
            rec["accepted"].append(bool(ok))
            if n_kept >= budget:
                stop = "budget"
                done = True
                break
        ucb = ucb_values(score, cnt, n_tot, alpha, next_chunk >= n_chunks)
        trace.append(rec)
        if done:
            break
    else:
        if not done and (next_chunk >= n_chunks).all():
            stop = "no_arm_left"
    res = BanditResult(
        order=np.concatenate(order) if order else np.zeros(0, dtype=np.int64), accepted=accepted,
        chunk_state=state, chunk_round=rnd, trimmed=np.asarray(trimmed, dtype=np.int64),
        probe_reward={i: v for i, v in ev.cache.items()}, pulls=pulls, score=score, cnt=cnt, n_tot=n_tot,
        ucb=ucb, trace=trace, rounds=rounds, n_evaluations=len(ev.cache), stop=stop, tau=tau, alpha=alpha,
    )
    res.extra["n_calibration"] = len(cal_idx)
    return res


# ----------------------------------------------------------------------------------- influence oracle
class InfluenceReward:
    """ρ(z) = cos(G_z, P(V)) (or the raw ⟨P(V), G_z⟩) with EK-FAC fitted on the pool (docs/methods/quad.md §3.2).

    V = Σ_{r ∈ targets} ∇ℓ_sum(r) over the tracked modules (``reference_agg="sum"``) or the mean of
    the unit-normalised per-target P(V_r) (``"mean_of_normalized"``, the reference code's average of
    per-target cosines). P is the damped EK-FAC inverse of :class:`curate.influence.Curvature`,
    fitted on a seeded sample of at most ``fit_examples`` **pool** rows (never on the targets, which
    was a defect of the reference code), or loaded from ``factors`` (``curate influence fit``).

    For every candidate the inner product and the norm come from the captured activations a_t and
    output gradients g_t: ⟨P, G⟩ = Σ_t g_tᵀ P a_t and ‖G‖² = Σ_{t,s} (g_t·g_s)(a_t·a_s), so no
    per-example gradient is formed.

    Args:
        model, tokenizer: a causal LM (``nn.Module``) and its tokenizer.
        pool: the pool table (``uid`` plus canonical text columns).
        targets: the target table (reference set R).
        modules: tracked modules (``"mlp+attn"`` as the paper; any :class:`Curvature` spec).
        factors: folder of fitted factors, or an already fitted ``Curvature``; None fits on the pool.
        fit_examples, damping, reward, reference_agg, max_length, batch_size, seed: see :class:`Quad`.
    """

    def __init__(self, model: Any, tokenizer: Any, pool: pl.DataFrame, targets: pl.DataFrame, *,
                 modules: str = "mlp+attn", factors: Any = None, fit_examples: int = 2000,
                 damping: float | str | None = "heuristic", reward: str = "cosine", reference_agg: str = "sum",
                 max_length: int = 256, batch_size: int = 4, seed: int = 0) -> None:
        from curate.features.lm import encode_examples
        from curate.influence.curvature import Curvature
        from curate.influence.scores import example_gradients
        from curate.influence.task import CausalLMTask

        self.torch = require("torch", "Quad influence rewards")
        self.model, self.reward, self.batch_size = model, reward, batch_size
        self.task = CausalLMTask(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.uids = pool["uid"].to_list()
        self.pos = {u: i for i, u in enumerate(self.uids)}
        self.examples = encode_examples(pool, tokenizer, max_length=max_length)
        tgt = encode_examples(targets, tokenizer, max_length=max_length)
        tgt = [e for e in tgt if e.n_response > 0]
        if not tgt:
            raise SchemaError("Quad: no target row has response tokens (a reference answer) to take a loss on.",
                              field="answer", expected="target rows with an answer or an assistant turn")
        if isinstance(factors, Curvature):
            curv = factors
        elif factors is not None:
            curv = Curvature.from_folder(factors, damping=damping)
        else:
            fit = [e for e in self.examples if e.n_response > 0]
            curv = Curvature(strategy="ekfac", modules=modules, fisher="true", damping=damping, seed=seed,
                             batch_size=batch_size, max_examples=fit_examples).fit(model, self.task, fit)
        self.curv = curv
        if reference_agg == "sum":
            v = example_gradients(curv, model, self.task, tgt, batch_size=batch_size, aggregate="sum")
            pv = curv.precondition({n: g[0] for n, g in v.items()})
        else:
            pv = {n: 0.0 for n in curv.names}
            for e in tgt:
                g = example_gradients(curv, model, self.task, [e], batch_size=1)
                p = curv.precondition({n: x[0] for n, x in g.items()})
                norm = math.sqrt(sum(float((x**2).sum()) for x in p.values())) or 1.0
                pv = {n: pv[n] + p[n] / (norm * len(tgt)) for n in curv.names}
        self.pv = pv
        self.pv_norm = math.sqrt(sum(float((x**2).sum()) for x in pv.values()))
        self.n_targets = len(tgt)

    def rows(self, idx: Sequence[int]) -> np.ndarray:
        """ρ for pool rows by position (rows without response tokens get 0)."""
        from curate.influence._capture import Tracker

        torch = self.torch
        idx = [int(i) for i in idx]
        out = np.zeros(len(idx))
        live = [j for j, i in enumerate(idx) if self.examples[i].n_response > 0]
        dev = next(self.model.parameters()).device
        with Tracker(self.model, self.curv.names, torch.float64) as tr:
            for s in range(0, len(live), self.batch_size):
                part = live[s : s + self.batch_size]
                batch = self.task.collate([self.examples[idx[j]] for j in part])
                tr.reset()
                tr.backward(self.task.loss(self.model, batch))
                mask = self.task.token_mask(batch)
                dot = 0.0
                norm2 = 0.0
                for n in self.curv.names:
                    calls = tr.calls(n, mask)
                    a = torch.cat([c[0] for c in calls], 1)
                    g = torch.cat([c[1] * c[2][..., None] for c in calls], 1)
                    p = self.pv[n].to(dev) if hasattr(self.pv[n], "to") else self.pv[n]
                    dot = dot + torch.einsum("bto,bto->b", g, a @ p.T)
                    if self.reward == "cosine":
                        norm2 = norm2 + ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
                if self.reward == "cosine":
                    den = torch.sqrt(torch.clamp(norm2, min=0.0)) * self.pv_norm
                    val = torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), 0.0)
                else:
                    val = dot
                out[part] = val.detach().cpu().numpy()
        return out

    def __call__(self, uids: Sequence[str]) -> np.ndarray:
        """ρ for pool rows by uid (the ``reward_fn`` protocol)."""
        try:
            idx = [self.pos[u] for u in uids]
        except KeyError as exc:
            raise MissingFeatureError(f"Quad reward: uid {exc.args[0]} is not in the pool the oracle was built on.") from None
        return self.rows(idx)


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
    64-row calibration sample). ``factors`` is a folder written by ``curate influence fit`` (else
    EK-FAC is fitted on ``fit_examples`` pool rows). See the module docstring for deviations.
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
    n_calibration: int = 64
    init: str = "random"
    fill: str = "none"
    kmeans_niter: int = 20
    reward: str = "cosine"
    reference_agg: str = "sum"
    path_params: ClassVar[tuple[str, ...]] = ("factors",)
    path_or_name_params: ClassVar[tuple[str, ...]] = ("model",)
    model: str = "default"
    modules: str = "mlp+attn"
    factors: str | None = None
    fit_examples: int = 2000
    damping: float | str = "heuristic"
    max_length: int = 256
    batch_size: int = 4
    max_targets: int | None = 64
    device: str = "auto"
    reward_fn: Any = None
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("n_clusters", 0), ("chunk_size", 0), ("probe_size", 0), ("arms_per_round", 0), ("alpha", -1.0),
        ("alpha", "big"), ("tau", float("nan")), ("gamma", 0.0), ("max_rounds", 0), ("max_probe_evals", 0),
        ("n_calibration", 1), ("init", "first"), ("fill", "all"), ("reward", "dot"), ("damping", -1.0),
        ("max_length", 1), ("batch_size", 0), ("max_targets", 0), ("fit_examples", 0),
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
        check_int(o, "n_calibration", self.n_calibration, 2)
        check_choice(o, "init", self.init, ("random", "index_order"))
        check_choice(o, "fill", self.fill, ("none", "ucb"))
        check_int(o, "kmeans_niter", self.kmeans_niter, 1)
        check_choice(o, "reward", self.reward, ("cosine", "influence"))
        check_choice(o, "reference_agg", self.reference_agg, ("sum", "mean_of_normalized"))
        check_str(o, "model", self.model)
        check_str(o, "modules", self.modules)
        check_str(o, "factors", self.factors, allow_none=True)
        check_int(o, "fit_examples", self.fit_examples, 1)
        if not (self.damping == "heuristic" if isinstance(self.damping, str) else False):
            check_float(o, "damping", self.damping, 0.0)
        check_int(o, "max_length", self.max_length, 8)
        check_int(o, "batch_size", self.batch_size, 1)
        check_int(o, "max_targets", self.max_targets, 1, allow_none=True)
        check_choice(o, "device", self.device, ("auto", "cpu", "cuda"))
        if self.reward_fn is not None and not callable(self.reward_fn):
            raise param_error(o, "reward_fn", "a callable uids -> rewards or None", self.reward_fn)

    def fills_budget(self) -> bool:
        return self.fill == "ucb"

    def params(self) -> dict[str, Any]:
        out = super().params()
        if out["reward_fn"] is not None:
            out["reward_fn"] = f"<injected {type(out['reward_fn']).__name__}>"
        return out

    # ------------------------------------------------------------------ the oracle
    def _oracle(self, ctx: SelectContext) -> Callable[[np.ndarray], np.ndarray]:
        uids = ctx.uids
        if self.reward_fn is not None:
            fn = self.reward_fn
            return lambda idx: np.asarray(fn([uids[i] for i in idx]), dtype=np.float64)
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
        oracle = InfluenceReward(lm, tok, ctx.table, targets, modules=self.modules, factors=self.factors,
                                 fit_examples=self.fit_examples, damping=self.damping, reward=self.reward,
                                 reference_agg=self.reference_agg, max_length=self.max_length,
                                 batch_size=self.batch_size, seed=ctx.seed)
        return oracle.rows

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
        res = run_bandit(chunks, dist, self._oracle(ctx), budget=k, alpha=self.alpha, tau=self.tau,
                         gamma=self.gamma, probe_size=m, arms_per_round=arms, max_rounds=self.max_rounds,
                         max_probe_evals=self.max_probe_evals, init=self.init, n_calibration=self.n_calibration,
                         n_rows=n, seed=ctx.seed)
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
            "n_kept_before_fill": len(res.order), "per_cluster": per_cluster, "ucb_trace": res.trace,
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
