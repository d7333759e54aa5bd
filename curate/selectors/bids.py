"""BIDS: balanced and influential data selection (docs/methods/less-bids.md Part B)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from curate.selectors._influence import Influence, task_groups
from curate.selectors.base import BaseSelector, Choice, SelectContext, check_bool, check_choice, stable_topk
from curate.selectors.less import SOURCES, check_weights, thi_counts


def column_zscore(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column z-score over all rows (ddof = 1), once (docs/methods/less-bids.md B.2).

    Returns (Ã restricted to the kept columns, boolean mask of kept columns). Columns with
    σ_j < 1e-12·(1 + |μ_j|) are dropped (the caller warns).
    """
    a = np.asarray(a, dtype=np.float64)
    if a.shape[0] < 2:
        return np.zeros_like(a), np.ones(a.shape[1], dtype=bool)
    mu = a.mean(axis=0)
    sd = a.std(axis=0, ddof=1)
    ok = sd >= 1e-12 * (1.0 + np.abs(mu))
    return (a[:, ok] - mu[ok]) / sd[ok], ok


def bids_naive(at: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paper Algorithm 1, the plain loop: O(N·M) per step.

    Returns (picks, gains, argmax column per pick, final reference r).
    """
    n, m = at.shape
    avail = np.ones(n, dtype=bool)
    s = np.zeros(m)
    r = np.zeros(m)
    picks, gains, cols = [], [], []
    for step in range(min(budget, n)):
        d = at - r
        u = d.max(axis=1)
        u[~avail] = -np.inf
        i = int(np.argmax(u))
        picks.append(i)
        gains.append(u[i])
        cols.append(int(np.argmax(d[i])))
        avail[i] = False
        s += at[i]
        r = s / (step + 1)
    return np.array(picks, dtype=np.int64), np.array(gains), np.array(cols, dtype=np.int64), r


def bids_rowmax(at: np.ndarray, budget: int, block: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Algorithm 1 with the exact row-max bound (docs/methods/less-bids.md B.4); output identical to :func:`bids_naive`.

    u_i = max_j fl(Ã_ij − r_j) <= fl(m_i − min_j r_j) with m_i = max_j Ã_ij, because rounded
    subtraction is monotone. Rows are scanned in (−m_i, index) order in growing blocks, and the scan
    stops at the first block whose leading bound is < the best u found; a bound equal to u* is still
    evaluated, so first-index ties are kept. The u values are the same float operations as the
    naive loop, so picks, gains and columns are bit-identical. On random scores the bound is loose
    (min_j r_j is far below the r_j of the column that attains u), so the speed-up is small; see
    :func:`bids_pruned` for the fast path.
    """
    n, m = at.shape
    mx = at.max(axis=1)
    srt = np.lexsort((np.arange(n), -mx))
    ms = mx[srt]
    pos_of = np.empty(n, dtype=np.int64)
    pos_of[srt] = np.arange(n)
    avail = np.ones(n, dtype=bool)  # in sorted positions
    s = np.zeros(m)
    r = np.zeros(m)
    picks, gains, cols = [], [], []
    start = 0
    for step in range(min(budget, n)):
        while not avail[start]:
            start += 1
        rmin = r.min()
        best_u, best_i = -np.inf, n
        pos, size = start, block
        while pos < n and not (ms[pos] - rmin < best_u):
            end = min(n, pos + size)
            idx = srt[pos:end]
            u = (at[idx] - r).max(axis=1)
            u[~avail[pos:end]] = -np.inf
            umax = u.max()
            if umax >= best_u and umax > -np.inf:
                cand = int(idx[u == umax].min())
                best_i = cand if umax > best_u else min(best_i, cand)
                best_u = umax
            pos = end
            size = min(size * 2, 16384)
        i = best_i
        picks.append(i)
        gains.append(best_u)
        cols.append(int(np.argmax(at[i] - r)))
        avail[pos_of[i]] = False
        s += at[i]
        r = s / (step + 1)
    return np.array(picks, dtype=np.int64), np.array(gains), np.array(cols, dtype=np.int64), r


def bids_pruned(at: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact fast path of Algorithm 1: per-column pointers instead of a scan over rows.

    max_i u_i = max_i max_j fl(Ã_ij − r_j) = max_j fl(top_j − r_j), where top_j is the largest
    *available* entry of column j, because rounded subtraction is monotone in Ã_ij. Each column is
    sorted once by (−Ã_ij, i); a pointer per column skips selected rows. The winning row is the
    smallest index among every (i, j) with fl(Ã_ij − r_j) = u*, found by walking down each column
    that attains u* while the rounded value still equals u*, so first-index ties match the naive
    loop exactly. Cost O(N·M log N) once, then O(M) per step (plus pointer moves); memory N·M int32.
    This goes beyond the row-max bound of docs/methods/less-bids.md B.4 (:func:`bids_rowmax`), which
    prunes little on dense random scores; output is bit-identical to :func:`bids_naive` (tested).
    """
    n, m = at.shape
    budget = min(budget, n)
    picks, gains, cols = [], [], []
    if budget == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros(m)
    order = np.argsort(-at, axis=0, kind="stable").astype(np.int32)  # (N, M): rows by (-value, index)
    colidx = np.arange(m)
    ptr = np.zeros(m, dtype=np.int64)
    avail = np.ones(n, dtype=bool)
    top = at[order[0], colidx]
    s = np.zeros(m)
    r = np.zeros(m)
    for step in range(budget):
        d = top - r
        u = d.max()
        best_i = n
        for j in np.flatnonzero(d == u):
            p, width = int(ptr[j]), 8
            while p < n:  # the rows with fl(Ã_ij − r_j) == u are a contiguous run from the pointer
                rows = order[p : p + width, j]
                eq = (at[rows, j] - r[j]) == u
                stop = int(np.argmin(eq)) if not eq.all() else len(rows)
                ok = rows[:stop][avail[rows[:stop]]]
                if len(ok):
                    best_i = min(best_i, int(ok.min()))
                if stop < len(rows):
                    break
                p, width = p + len(rows), width * 4
        i = best_i
        picks.append(i)
        gains.append(u)
        cols.append(int(np.argmax(at[i] - r)))
        avail[i] = False
        s += at[i]
        r = s / (step + 1)
        if step + 1 == budget:
            break
        for j in np.flatnonzero(order[ptr, colidx] == i):
            p = ptr[j]
            while p < n - 1 and not avail[order[p, j]]:
                p += 1
            ptr[j] = p
            top[j] = at[order[p, j], j] if avail[order[p, j]] else -np.inf
    return np.array(picks, dtype=np.int64), np.array(gains), np.array(cols, dtype=np.int64), r


@dataclass(frozen=True, kw_only=True)
class BidsSelector(BaseSelector):
    """BIDS: column-normalised influence, iterative selection of the most under-served target.

    Dai, Zhang, Ma, Peng, "Balanced and Influential Data Selection", arXiv 2501.12147 (v0.3
    preprint formulas; no official code). A is the LESS matrix (roles ``grads``/``target_grads``,
    or ``scores``). Each column is z-scored over the pool (ddof 1; zero-variance columns dropped
    with a warning), then greedy Algorithm 1: pick argmax_i max_j (Ã_ij − r_j) with r the mean
    normalised row of the selected set (r = 0 at step 1; first index, i.e. smallest uid, on
    ties). ``rank`` is the pick order; ``score`` is the gain at the pick (kept rows) or against the
    final r (others). ``normalize``/``iterative`` give the paper's ablation ladder; ``prune``
    uses the exact row-max bound (identical output, much faster).

    BIDS balances normalised influence across tasks; it does not select equal numbers per task.
    """

    name: ClassVar[str] = "bids"
    requires: ClassVar[tuple[str, ...]] = ("grads", "target_grads")
    default_features: ClassVar[dict[str, str]] = {"grads": "grad/adam", "target_grads": "grad/sgd/targets"}
    normalize: bool = True
    iterative: bool = True
    prune: bool = True
    source: str = "grads"
    checkpoint_weights: tuple[float, ...] | None = None
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (("source", "ekfac"), ("checkpoint_weights", ()))

    def __post_init__(self) -> None:
        check_bool("BIDS", "normalize", self.normalize)
        check_bool("BIDS", "iterative", self.iterative)
        check_bool("BIDS", "prune", self.prune)
        check_choice("BIDS", "source", self.source, SOURCES)
        object.__setattr__(self, "checkpoint_weights", check_weights("BIDS", self.checkpoint_weights))

    def required_features(self) -> tuple[str, ...]:
        return ("scores",) if self.source == "scores" else self.requires

    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        inf = Influence(ctx, self.source, self.checkpoint_weights)
        a = inf.full(ctx.n)
        names, groups, col_task = task_groups(ctx, inf.target_uids)
        diag: dict[str, Any] = {"n_targets": inf.m, "tasks": names}
        if self.normalize:
            at, ok = column_zscore(a)
            if not ok.all():
                dropped = inf.target_uids[~ok].tolist()
                warnings.warn(f"bids: {len(dropped)} zero-variance target column(s) dropped: {dropped[:10]}",
                              stacklevel=3)
                diag["dropped_targets"] = dropped
        else:
            at, ok = a.copy(), np.ones(a.shape[1], dtype=bool)
        cols_uid = inf.target_uids[ok]
        cols_task = col_task[ok]
        if at.shape[1] == 0:
            warnings.warn("bids: every target column was dropped; picking by uid order.", stacklevel=3)
            at = np.zeros((ctx.n, 1))
            cols_uid, cols_task = np.array([""], dtype=object), np.array(["all"], dtype=object)
        if self.iterative:
            picks, gains, pcols, r = (bids_pruned if self.prune else bids_naive)(at, k)
            score = np.empty(ctx.n)
            col = np.empty(ctx.n, dtype=np.int64)
            step = max(1, 2**22 // at.shape[1])
            for s in range(0, ctx.n, step):
                d = at[s : s + step] - r
                score[s : s + step] = d.max(axis=1)
                col[s : s + step] = d.argmax(axis=1)
            score[picks] = gains
            col[picks] = pcols
        else:
            score = at.max(axis=1)
            col = at.argmax(axis=1)
            picks = stable_topk(score, k)
        group_sums = np.stack([a[picks][:, g].sum(axis=1) for g in groups], axis=1) if len(picks) else np.zeros((0, len(groups)))
        diag["thi"] = thi_counts(group_sums, names)
        if len(picks):
            diag["aid_raw"] = {t: float(a[picks][:, g].mean()) for t, g in zip(names, groups, strict=False)}
            norm_groups = [np.flatnonzero(cols_task == t) for t in names]
            diag["aid_normalized"] = {
                t: (float(at[picks][:, g].mean()) if len(g) else None) for t, g in zip(names, norm_groups, strict=False)
            }
        return Choice(
            order=picks, score=score,
            extra={"target": cols_uid[col].tolist(), "task": cols_task[col].tolist()},
            diagnostics=diag,
        )
