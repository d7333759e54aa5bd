"""Optimal-transport solvers of TAROT (docs/methods/tarot.md §2): exact EMD values, and entropic
potentials by annealed log-domain Sinkhorn, dense or over a truncated kernel with a Newton finish."""

from __future__ import annotations

import math
import warnings

import numpy as np

from curate._lazy import require

STAGE_WORK = 100_000_000  # plan-entry updates an intermediate stage of the truncated solver may spend
NEWTON_MAX_NNZ = 2_000_000  # kept plan entries above which the Newton polish is skipped
NEWTON_MAX_SIDE = 5_000  # min(n, m) above which it is skipped (a dense min(n, m)² solve per step)


def euclid_cost(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """‖x̂ − ŷ‖₂ = √(2 − 2 x̂·ŷ) for unit rows (the TAROT cost, not squared)."""
    return np.sqrt(np.maximum(2.0 - 2.0 * (x @ y.T), 0.0))


def exact_ot(x: np.ndarray, y: np.ndarray) -> float:
    """Exact OT value with uniform weights (``ot.emd2``), Euclidean cost between unit rows."""
    ot = require("ot", "TAROT optimal transport")
    if len(x) == 0 or len(y) == 0:
        return math.inf
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    return float(ot.emd2(a, b, euclid_cost(x, y), numItermax=10_000_000))


def _lse(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of ``x`` (n, m) using ``out`` (n, m) as scratch."""
    mx = x.max(axis=1)
    np.subtract(x, mx[:, None], out=out)
    np.exp(out, out=out)
    return mx + np.log(out.sum(axis=1))


def sinkhorn_log(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float, *, max_iter: int, tol: float,
                 warm: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Log-domain Sinkhorn, the same iteration as POT's ``ot.bregman.sinkhorn_log`` (v-update then
    u-update, marginal error ‖P·1 column sums − b‖₂ checked every 10 iterations), written with
    in-place numpy so that a 1000×1000 problem costs ~4 passes over C per half-step instead of
    scipy's ~10. Returns (log_u, log_v, final error); P = exp(log_u ⊕ log_v − C/ε)."""
    mr = -cost / eps
    mrt = np.ascontiguousarray(mr.T)
    scratch, scratch_t = np.empty_like(mr), np.empty_like(mrt)
    log_a, log_b = np.log(a), np.log(b)
    u, v = (np.zeros(len(a)), np.zeros(len(b))) if warm is None else (warm[0].copy(), warm[1].copy())
    err = np.inf
    for it in range(max_iter):
        v = log_b - _lse(mrt + u[None, :], scratch_t)
        u = log_a - _lse(mr + v[None, :], scratch)
        if it % 10 == 0:
            np.add(mrt, u[None, :], out=scratch_t)
            scratch_t += v[:, None]
            np.exp(scratch_t, out=scratch_t)
            err = float(np.linalg.norm(scratch_t.sum(axis=1) - b))
            if err < tol:
                break
    return u, v, err


def entropic_ot(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float, *, scaling: float = 0.5,
                inner_iter: int = 200, max_iter: int = 2000, tol: float = 1e-6, truncated: bool = False
                ) -> tuple[float, np.ndarray, np.ndarray]:
    """Annealed log-domain Sinkhorn with geomloss-convention potentials (docs/methods/tarot.md §2).

    ε starts at max C and is multiplied by ``scaling``² per stage down to ``eps``; intermediate
    stages run ≤ ``inner_iter`` iterations, the last ≤ ``max_iter``, each to marginal error ``tol``,
    warm-started by rescaling the potentials. Each stage is :func:`sinkhorn_log` (POT's iteration;
    ``ot.bregman.sinkhorn_log`` itself, with scipy's log-sum-exp, made the N = 100,000 benchmark
    miss its 60 s goal; tests check the value against ``ot.solve(M, a, b, reg=ε)``).
    ``truncated=True`` runs each stage with :func:`sinkhorn_log_truncated`: the same iterates over a
    truncated kernel, which is what makes ε = 1e-3 on thousands × thousands of points take seconds.

    Returns:
        (OT_ε value = ⟨a, f⟩ + ⟨b, g⟩, f, g) with the plan a_i b_j exp((f_i + g_j − C_ij)/ε).
    """
    log_a, log_b = np.log(a), np.log(b)
    e = max(float(cost.max()), eps)
    warm = None
    while True:
        final = e <= eps
        if truncated and final:
            lu, lv, err = sinkhorn_log_truncated(a, b, cost, e, max_iter=max_iter, tol=tol, warm=warm)
        elif truncated:
            lu, lv, err = sinkhorn_log_truncated(a, b, cost, e, max_iter=inner_iter, tol=tol, warm=warm, theta=20.0,
                                                 margin=5.0, work=STAGE_WORK)
        else:
            lu, lv, err = sinkhorn_log(a, b, cost, e, max_iter=max_iter if final else inner_iter, tol=tol, warm=warm)
        if final:
            if truncated:
                lu, lv, err = newton_polish(a, b, cost, e, lu, lv)
            break
        nxt = max(e * scaling**2, eps)
        warm = ((lu - log_a) * e / nxt + log_a, (lv - log_b) * e / nxt + log_b)
        e = nxt
    if err > 1e-4:
        warnings.warn(f"tarot: Sinkhorn at eps={eps} ended with marginal error {err:.2e}.", stacklevel=2)
    f = eps * (lu - log_a)
    g = eps * (lv - log_b)
    return float(a @ f + b @ g), f, g


class _Support:
    """The entries of a plan P = exp(−C/ε ⊕ log u ⊕ log v) that a truncated Sinkhorn step keeps.

    (i, j) is kept when log P_ij is within ``theta`` of the largest log P of row i or of column j,
    evaluated at the scalings (u₀, v₀) of the last build. A row update sums e^{t_ij} with
    t_ij = −C_ij/ε + log v_j, so an entry left out at build time is still below its row's maximum by
    more than θ − spread(log v − log v₀); likewise columns with u. :meth:`valid` checks that the
    spreads stay within ``margin``, which keeps every dropped term below e^{−(θ − margin)} times its
    row's (column's) largest term (Schmitzer 2019, "Stabilized sparse scaling algorithms for
    entropy regularized transport problems", §3.3 kernel truncation).
    """

    def __init__(self, mr: np.ndarray, u: np.ndarray, v: np.ndarray, theta: float, margin: float,
                 dense_above: float = 1.0) -> None:
        lp = mr + u[:, None]
        lp += v[None, :]
        keep = lp >= lp.max(axis=1, keepdims=True) - theta
        keep |= lp >= lp.max(axis=0, keepdims=True) - theta
        self.density = float(keep.mean())
        self.u0, self.v0, self.margin = u.copy(), v.copy(), margin
        if self.density > dense_above:  # the caller runs the dense iteration: no index arrays
            return
        self.ri, self.ci = np.nonzero(keep)  # row-major: rows contiguous
        self.mr_r = mr[self.ri, self.ci]
        perm = np.argsort(self.ci, kind="stable")
        self.ri_c, self.ci_c, self.mr_c = self.ri[perm], self.ci[perm], self.mr_r[perm]
        self.row_ptr = np.r_[0, np.cumsum(np.bincount(self.ri, minlength=mr.shape[0]))[:-1]]
        self.col_ptr = np.r_[0, np.cumsum(np.bincount(self.ci, minlength=mr.shape[1]))[:-1]]

    def valid(self, x: np.ndarray, x0: np.ndarray) -> bool:
        d = x - x0
        return bool(d.max() - d.min() <= self.margin)


def _seg_lse(x: np.ndarray, ptr: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Log-sum-exp of each contiguous segment of ``x`` (segment starts ``ptr``, segment id per entry ``seg``)."""
    mx = np.maximum.reduceat(x, ptr)
    x -= mx[seg]
    np.exp(x, out=x)
    return mx + np.log(np.add.reduceat(x, ptr))


def sinkhorn_log_truncated(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float, *, max_iter: int,
                           tol: float, warm: tuple[np.ndarray, np.ndarray] | None = None, theta: float = 40.0,
                           margin: float = 10.0, dense_above: float = 0.3, work: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`sinkhorn_log` on a truncated kernel: the same iterates, each step over a few entries per row.

    At small ε nearly all of P is below e^{−40} of its row and column maxima (1935 × 3554 tie-break
    of the demo at ε = 1e-3: 0.4% of entries within e^{−50}), so the log-sum-exps run over the kept
    entries of :class:`_Support` only; the support is rebuilt from the dense cost (one pass) whenever
    the scalings drift by more than ``margin``, so every dropped term stays below e^{−theta} of its
    line's largest term (relative error ≤ max(n, m)·e^{−40} ≈ 1e-14 per log-sum-exp: the iterates are
    those of the dense iteration up to rounding). Stages whose support is denser than ``dense_above``
    run the dense :func:`sinkhorn_log` (cheaper per entry). Same update order, error and stopping rule.
    """
    mr = -cost / eps
    log_a, log_b = np.log(a), np.log(b)
    u, v = (np.zeros(len(a)), np.zeros(len(b))) if warm is None else (warm[0].copy(), warm[1].copy())
    sup = _Support(mr, u, v, theta + margin, margin, dense_above)
    if sup.density > dense_above:
        cap = max_iter if work is None else min(max_iter, max(10, work // cost.size))
        return sinkhorn_log(a, b, cost, eps, max_iter=cap, tol=tol, warm=(u, v))
    if work is not None:
        max_iter = min(max_iter, max(10, work // len(sup.ri)))
    err = np.inf
    for it in range(max_iter):
        if not sup.valid(u, sup.u0):
            sup = _Support(mr, u, v, theta + margin, margin)
        v = log_b - _seg_lse(sup.mr_c + u[sup.ri_c], sup.col_ptr, sup.ci_c)
        if not sup.valid(v, sup.v0):
            sup = _Support(mr, u, v, theta + margin, margin)
        u = log_a - _seg_lse(sup.mr_r + v[sup.ci], sup.row_ptr, sup.ri)
        if it % 10 == 0:
            if not sup.valid(u, sup.u0):
                sup = _Support(mr, u, v, theta + margin, margin)
            x = sup.mr_c + u[sup.ri_c]
            x += v[sup.ci_c]
            np.exp(x, out=x)
            err = float(np.linalg.norm(np.add.reduceat(x, sup.col_ptr) - b))
            if err < tol:
                break
    return u, v, err


def _newton_step(p: np.ndarray, ri: np.ndarray, ci: np.ndarray, r: np.ndarray, c: np.ndarray, ga: np.ndarray,
                 gb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Solve [[D_r, P], [Pᵀ, D_c]] (δu, δv) = (g_a, g_b), D = diag(·) + λI, by the Schur complement on the
    smaller side (dense min(n, m)² solve; P has a few entries per row). λ = 1e-10·mean(r) (Levenberg):
    groups that the kept entries leave unconnected make the system singular; along them the step
    follows the gradient, cut by the caller's trust region, until their coupling entries appear."""
    import scipy.sparse as sp

    n, m = len(r), len(c)
    lam = 1e-10 * float(r.mean())
    pm = sp.csr_matrix((p, (ri, ci)), shape=(n, m))
    flip = n > m
    if flip:  # eliminate u instead of v: the same system with the roles swapped
        pm, r, c, ga, gb = pm.T.tocsr(), c, r, gb, ga
    dr, dc = r + lam, c + lam
    s = (pm @ sp.diags(1.0 / dc) @ pm.T).toarray()
    s = np.diag(dr) - s
    try:  # numpy's LU: scipy's Cholesky here links a slower LAPACK (3x on the 1935² demo system)
        x = np.linalg.solve(s, ga - pm @ (gb / dc))
    except np.linalg.LinAlgError:
        return None, None
    y = (gb - pm.T @ x) / dc
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return None, None
    return (y, x) if flip else (x, y)


def newton_polish(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float, u: np.ndarray, v: np.ndarray, *,
                  theta: float = 40.0, margin: float = 10.0, max_steps: int = 100, max_step: float = 5.0,
                  tol: float = 1e-11) -> tuple[np.ndarray, np.ndarray, float]:
    """Newton steps on the entropic dual from Sinkhorn scalings (Brauer, Clason, Lorenz, Wirth 2017,
    "A Sinkhorn–Newton method for entropic optimal transport", arXiv 1710.06635), over the truncated kernel.

    In log-scalings the dual Φ(u, v) = ⟨a, u⟩ + ⟨b, v⟩ − Σ_ij P_ij, P = exp(−C/ε ⊕ u ⊕ v), is concave with
    gradient (a − P1, b − Pᵀ1) and negative Hessian H = [[diag(P1), P], [Pᵀ, diag(Pᵀ1)]]. Each step solves
    (H + λI) δ = ∇Φ (:func:`_newton_step`), with a trust region of ``max_step`` on the largest change of a
    log-scaling, halving the step until the L1 marginal error or Φ improves. Sinkhorn converges linearly and slowly at ε = 1e-3 along
    weakly coupled groups of points (its stopping test on the marginals can leave potentials 1e-2 off,
    ten times the ε-scale gaps that decide a tie-break); Newton converges quadratically from there.
    Stops at L1 marginal error ``tol``, after ``max_steps``, or when a step no longer helps.

    Returns:
        (u, v, ‖Pᵀ1 − b‖₂), the same quantities as :func:`sinkhorn_log`.
    """
    n, m = len(a), len(b)
    mr = -cost / eps
    sup = _Support(mr, u, v, theta + margin, margin, dense_above=NEWTON_MAX_NNZ / (n * m))
    if sup.density > NEWTON_MAX_NNZ / (n * m) or min(n, m) > NEWTON_MAX_SIDE:
        return u, v, float(np.linalg.norm(np.exp(mr + u[:, None] + v[None, :]).sum(axis=0) - b))

    def state(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
        p = np.exp(sup.mr_r + u[sup.ri] + v[sup.ci])
        r, c = np.bincount(sup.ri, p, n), np.bincount(sup.ci, p, m)
        return p, r, c, float(np.abs(a - r).sum() + np.abs(b - c).sum()), float(a @ u + b @ v - p.sum())

    p, r, c, res, obj = state(u, v)
    for _ in range(max_steps):
        if res < tol:
            break
        du, dv = _newton_step(p, sup.ri, sup.ci, r, c, a - r, b - c)
        if du is None:
            break
        # trust region: far from the optimum the step along a weakly coupled group is huge (cond(H) ~ 1e16)
        t, done = min(1.0, max_step / max(float(np.abs(du).max()), float(np.abs(dv).max()), 1e-300)), True
        for _ in range(12):
            u2, v2 = u + t * du, v + t * dv
            if not (sup.valid(u2, sup.u0) and sup.valid(v2, sup.v0)):
                sup = _Support(mr, u2, v2, theta + margin, margin)
                p, r, c, res, obj = state(u, v)
            p2, r2, c2, res2, obj2 = state(u2, v2)
            if res2 < res or obj2 > obj:
                u, v, p, r, c, res, obj, done = u2, v2, p2, r2, c2, res2, obj2, False
                break
            t /= 2
        if done:
            break
    return u, v, float(np.linalg.norm(c - b))
