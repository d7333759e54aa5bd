"""Quad's bandit over clusters (docs/methods/quad.md §3.3-§3.5), independent of where rewards come from.

Zhang et al., arXiv 2409.16986. A pull of cluster k draws ``probe_size`` rows from its next chunk and
scores them; r = mean ρ(probe) − τ; r > 0 accepts the whole chunk. Neighbour credit
score[j] += r·(1 − D[k, j]/γ), cnt[j] += 1 for D[k, j] < γ (the pulled arm always credits itself);
UCB[j] = score/cnt + α·√(2 ln N_tot / (cnt + 1)); exhausted arms get −∞; ``arms_per_round`` arms per
round, chosen with the UCB of the end of the previous round. ``tau`` / ``alpha`` ``"auto"`` come from
a uniform calibration sample (τ = mean, α = 0.025·std). A row scored twice is scored once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curate._lazy import require
from curate.errors import SchemaError

# rng streams (np.random.default_rng([seed, stream])) so the stages do not share draws
S_KMEANS, S_CHUNKS, S_CAL, S_INIT, S_PROBE, S_TARGETS = 1, 2, 3, 4, 5, 6

#: progress hook of :func:`run_bandit`: (event, facts) with event "calibration" or "pull"
EventFn = Callable[[str, dict[str, Any]], None]


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
    on_event: EventFn | None = None,
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
        on_event: progress hook, called with ``("calibration", {"rows"})`` before the calibration
            sample is scored and ``("pull", {"round", "kept", "evaluations"})`` after every pull.
    """
    k = len(chunks)
    ev = _Evaluator(reward)
    n_all = n_rows if n_rows is not None else sum(len(c) for cl in chunks for c in cl)
    cal_idx = np.zeros(0, dtype=np.int64)
    if isinstance(tau, str) or isinstance(alpha, str):
        n_cal = min(n_all, n_calibration)
        cal_idx = np.sort(np.random.default_rng([seed, S_CAL]).choice(n_all, size=n_cal, replace=False))
        if on_event is not None:
            on_event("calibration", {"rows": n_cal})
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
            if on_event is not None:
                on_event("pull", {"round": r, "kept": n_kept, "evaluations": len(ev.cache)})
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


class BanditProgress:
    """A tqdm bar over the budget's rows that shows the bandit's round and scored rows (or nothing)."""

    def __init__(self, enabled: bool, budget: int) -> None:
        tqdm = require("tqdm", "progress bars").tqdm if enabled else None
        self.bar = tqdm(total=budget, desc="quad: bandit", unit="row") if tqdm is not None else None

    def __call__(self, event: str, facts: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if event == "calibration":
            self.bar.set_postfix_str(f"scoring {facts['rows']} calibration rows")
        else:
            self.bar.update(facts["kept"] - self.bar.n)
            self.bar.set_postfix_str(f"round {facts['round'] + 1}, {facts['evaluations']} rows scored")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
