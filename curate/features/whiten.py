"""TAROT whitened features (docs/methods/gradient-features.md §9).

Feng et al., "TAROT: Targeted Data Selection via Optimal Transport", ICML 2025, arXiv 2412.00420
(code ``vita-epfl/TAROT``). Candidates Φ (N×d) and targets Ψ (M×d) are centred *jointly*, the
covariance Σ of the stacked rows gets a ridge, Σ_λ = LLᵀ (Cholesky, float64), Z = X_c L⁻ᵀ, and each
row is normalised, so ẑ_x·ẑ_y is the Mahalanobis cosine x_cᵀΣ_λ⁻¹y_c / √(…)(…).

Deviation from the reference: the ridge is relative by default, Σ + λ·(tr Σ/d)·I with λ = 1e-3,
because the reference's absolute 1e-5·I can exceed the feature variances of its √P-scaled features
and turn whitening into an isotropic rescale (``ridge_mode="absolute"`` reproduces it). The mean and
covariance are accumulated in float64 row chunks, so memory is d² plus one chunk.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate.errors import SchemaError, param_error
from curate.pipeline.registry import register_step

RIDGE_MODES = ("relative", "absolute")
METHODS = ("cholesky", "zca")


def _check(name: str, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x.reshape(len(x), -1)
    if x.ndim != 2:
        raise SchemaError("features must be a 2-d array.", field=name, expected="(n, d)", found=x.shape)
    if not np.all(np.isfinite(x)):
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise SchemaError("features contain NaN or infinite values.", line=row + 1, field=name, expected="finite values",
                          found="NaN/inf")
    return x


def _whiten_factor(phi: np.ndarray, psi: np.ndarray, ridge: float, ridge_mode: str, method: str,
                   chunk: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(μ, W, λ used) with z = (x − μ) W: W = L⁻ᵀ (Cholesky) or Σ_λ^{-1/2} (ZCA)."""
    n, d = phi.shape[0] + psi.shape[0], phi.shape[1]
    total = np.zeros(d)
    for block in (phi, psi):
        for s in range(0, len(block), chunk):
            total += block[s : s + chunk].sum(axis=0, dtype=np.float64)
    mu = total / n
    cov = np.zeros((d, d))
    for block in (phi, psi):
        for s in range(0, len(block), chunk):
            xc = np.asarray(block[s : s + chunk], dtype=np.float64) - mu
            cov += xc.T @ xc
    cov /= n
    scale = np.trace(cov) / d if ridge_mode == "relative" else 1.0
    lam = float(ridge)
    for attempt in range(4):
        reg = cov + lam * scale * np.eye(d)
        try:
            if method == "cholesky":
                low = np.linalg.cholesky(reg)
                w = np.linalg.solve(low, np.eye(d)).T  # L⁻ᵀ, computed once (d × d)
            else:
                vals, vecs = np.linalg.eigh(reg)
                if vals.min() <= 0:
                    raise np.linalg.LinAlgError("not positive definite")
                w = (vecs / np.sqrt(vals)) @ vecs.T
            return mu, w, lam
        except np.linalg.LinAlgError:
            if attempt == 3:
                raise
            new = lam * 10 if lam > 0 else 1e-12
            warnings.warn(f"whitening: covariance not positive definite at ridge {lam:g}; retrying with {new:g}.",
                          stacklevel=3)
            lam = new
    raise AssertionError("unreachable")


def whiten(
    phi: Any,
    psi: Any,
    *,
    ridge: float = 1e-3,
    ridge_mode: str = "relative",
    method: str = "cholesky",
    chunk: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """Whitened, row-normalised candidate and target features (float64).

    Args:
        phi: candidates (N, d) (or (N, C, d), flattened).
        psi: targets (M, d).
        ridge: λ ≥ 0.
        ridge_mode: ``relative`` (λ·tr Σ/d, default) | ``absolute`` (λ, the reference).
        method: ``cholesky`` (default) | ``zca`` (same cosines, tested).
        chunk: rows per chunk for the mean, covariance and the solve.

    Returns:
        (Ẑ_D (N, d), Ẑ_Q (M, d)); the whitened cosine matrix is ``Ẑ_D @ Ẑ_Q.T``.

    Raises:
        SchemaError: NaN/inf features or mismatched widths. ParameterError: bad ridge/mode/method.
    """
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not np.isfinite(ridge) or ridge < 0:
        raise param_error("whiten", "ridge", "a finite number >= 0", ridge)
    if ridge_mode not in RIDGE_MODES:
        raise param_error("whiten", "ridge_mode", f"one of {RIDGE_MODES}", ridge_mode)
    if method not in METHODS:
        raise param_error("whiten", "method", f"one of {METHODS}", method)
    if not isinstance(chunk, int) or chunk < 1:
        raise param_error("whiten", "chunk", "an integer >= 1", chunk)
    phi, psi = _check("phi", phi), _check("psi", psi)
    if phi.shape[1] != psi.shape[1]:
        raise SchemaError("candidate and target features differ in width.", field="psi",
                          expected=f"(M, {phi.shape[1]})", found=psi.shape)
    n, d = phi.shape[0] + psi.shape[0], phi.shape[1]
    if n <= d:
        warnings.warn(f"whitening {n} rows in {d} dimensions (N + M <= d): the covariance is singular and only the "
                      "ridge makes it invertible.", stacklevel=2)
    elif n < 2 * d:
        warnings.warn(f"whitening {n} rows in {d} dimensions (N + M < 2d): the covariance is poorly estimated.",
                      stacklevel=2)
    mu, w, _ = _whiten_factor(phi, psi, float(ridge), ridge_mode, method, chunk)

    def apply(x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), d))
        for s in range(0, len(x), chunk):
            z = (np.asarray(x[s : s + chunk], dtype=np.float64) - mu) @ w
            out[s : s + chunk] = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        return out

    return apply(phi), apply(psi)


def lowrank_whiten(phi: Any, psi: Any, *, rank: int, shrink: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Whitening in the top ``rank`` principal directions of the joint covariance, with shrinkage.

    With Σ = V Λ Vᵀ the covariance of the jointly centred rows of [Φ; Ψ] (eigenvalues descending),
    z = (x − μ) V_r (Λ_r + s·λ̄_r I)^{-1/2} and ẑ = z/‖z‖, where λ̄_r is the mean of the kept
    eigenvalues and s = ``shrink``. Dropping the trailing directions keeps whitening from blowing up
    the directions whose variance a few thousand rows cannot estimate (the sample eigenvalues of
    a d-dimensional covariance are badly spread unless N + M ≫ d); the shrinkage halves the
    boost of the weakest kept direction relative to full whitening. ``rank = d`` and ``shrink → 0``
    is full (ZCA-equivalent) whitening up to a rotation, which leaves the cosines unchanged.

    Returns:
        (Ẑ_D (N, rank), Ẑ_Q (M, rank)) float64 unit rows.
    """
    phi, psi = _check("phi", phi), _check("psi", psi)
    d = phi.shape[1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
        raise param_error("lowrank_whiten", "rank", f"an integer in [1, {d}]", rank)
    if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not np.isfinite(shrink) or shrink < 0:
        raise param_error("lowrank_whiten", "shrink", "a finite number >= 0", shrink)
    x = np.vstack([np.asarray(phi, dtype=np.float64), np.asarray(psi, dtype=np.float64)])
    mu = x.mean(axis=0)
    xc = x - mu
    vals, vecs = np.linalg.eigh(xc.T @ xc / len(x))
    top = np.argsort(-vals, kind="stable")[:rank]
    lam = np.maximum(vals[top], 0.0)
    w = vecs[:, top] / np.sqrt(lam + float(shrink) * lam.mean() + 1e-12)
    z = xc @ w
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    return z[: len(phi)], z[len(phi) :]


def mahalanobis_cosine(phi: Any, psi: Any, *, ridge: float = 1e-3, ridge_mode: str = "relative") -> np.ndarray:
    """Direct reference: x_cᵀΣ_λ⁻¹y_c / √((x_cᵀΣ_λ⁻¹x_c)(y_cᵀΣ_λ⁻¹y_c)) with a dense inverse (small d only)."""
    phi, psi = np.asarray(phi, dtype=np.float64), np.asarray(psi, dtype=np.float64)
    x = np.vstack([phi, psi])
    mu = x.mean(axis=0)
    xc = x - mu
    cov = xc.T @ xc / len(x)
    d = x.shape[1]
    scale = np.trace(cov) / d if ridge_mode == "relative" else 1.0
    inv = np.linalg.inv(cov + ridge * scale * np.eye(d))
    a, b = phi - mu, psi - mu
    num = a @ inv @ b.T
    na = np.sqrt(np.einsum("ij,jk,ik->i", a, inv, a))
    nb = np.sqrt(np.einsum("ij,jk,ik->i", b, inv, b))
    return num / np.outer(na, nb)


def whiten_feature_sets(pool: Any, targets: Any, *, ridge: float = 1e-3, ridge_mode: str = "relative",
                        name: str = "grad/whitened") -> tuple[Any, Any]:
    """Whiten two :class:`~curate.io.store.FeatureSet` objects together.

    Returns (pool set ``name``, target set ``name + '/targets'``), float32 values, meta carrying the
    inputs' meta plus ``whitened``, ``ridge``, ``ridge_mode``. Raises if the inputs were computed with
    different layouts or projectors.
    """
    from curate.features.gradients import check_compatible
    from curate.io.store import FeatureSet

    check_compatible(pool.meta, targets.meta)
    zd, zq = whiten(pool.values, targets.values, ridge=ridge, ridge_mode=ridge_mode)
    meta = {k: v for k, v in pool.meta.items() if k not in ("cache_key", "reasons", "losses")}
    meta.update({"whitened": True, "ridge": ridge, "ridge_mode": ridge_mode, "normalized": True,
                 "source_features": [pool.name, targets.name]})
    return (FeatureSet(name, pool.uids, zd.astype(np.float32), dict(meta)),
            FeatureSet(f"{name}/targets", targets.uids, zq.astype(np.float32), dict(meta)))


# ------------------------------------------------------------------------------------ the step
def _matrix(fs: Any) -> np.ndarray:
    """(n, d) values of a feature set; (n, C, d) checkpoint stacks become Φ̃ = [√w₁Φ₁ | … | √w_CΦ_C]
    with the set's ``lr_weights`` (docs/methods/gradient-features.md §7), so whitening sees the
    weighted combination."""
    values = np.asarray(fs.values)
    if values.ndim == 3:
        from curate.features.checkpoints import stack_checkpoints

        weights = fs.meta.get("lr_weights") or [1.0] * values.shape[1]
        return stack_checkpoints([values[:, c] for c in range(values.shape[1])], weights)
    return values


def whiten_sets(pool: Any, targets: Any, *, ridge: float = 1e-3, ridge_mode: str = "relative",
                name: str = "grad/whitened", target_name: str | None = None) -> tuple[Any, Any, np.ndarray]:
    """Whiten a pool and a target :class:`~curate.io.store.FeatureSet` together (TAROT,
    docs/methods/gradient-features.md §9).

    Unlike :func:`whiten_feature_sets`, all-zero pool or target rows (``no_response_tokens`` /
    ``zero_gradient`` rows of gradient features) are left out of the mean and covariance and stay
    zero in the output, so they cannot pull the centring; (N, C, d) checkpoint stacks are combined
    with their learning-rate weights first.

    Returns:
        (pool set ``name``, target set ``target_name`` (default ``name + '/targets'``), mask of the
        pool rows left out).

    Raises:
        SchemaError: NaN/inf values, widths that differ, layouts or projectors that differ.
    """
    from curate.features.gradients import check_compatible
    from curate.io.store import FeatureSet

    check_compatible(pool.meta, targets.meta)
    phi, psi = _check(pool.name, _matrix(pool)), _check(targets.name, _matrix(targets))
    zero_d = ~np.any(phi != 0, axis=1)
    zero_q = ~np.any(psi != 0, axis=1)
    if (~zero_d).sum() + (~zero_q).sum() < 2:
        raise SchemaError("whitening needs at least two non-zero feature rows.", field=pool.name,
                          expected=">= 2 non-zero rows", found=int((~zero_d).sum() + (~zero_q).sum()))
    zd = np.zeros(phi.shape)
    zq = np.zeros(psi.shape)
    zd[~zero_d], zq[~zero_q] = whiten(phi[~zero_d], psi[~zero_q], ridge=ridge, ridge_mode=ridge_mode)
    drop = ("cache_key", "reasons", "losses")
    extra = {"whitened": True, "ridge": ridge, "ridge_mode": ridge_mode, "normalized": True,
             "source_features": [pool.name, targets.name], "n_zero_rows": int(zero_d.sum() + zero_q.sum()),
             "dim": int(phi.shape[1])}
    meta = {**{k: v for k, v in pool.meta.items() if k not in drop}, **extra}
    tmeta = {**{k: v for k, v in targets.meta.items() if k not in drop}, **extra}
    return (FeatureSet(name, pool.uids, zd.astype(np.float32), meta),
            FeatureSet(target_name or f"{name}/targets", targets.uids, zq.astype(np.float32), tmeta), zero_d)


@register_step("whiten")
@dataclass(frozen=True, kw_only=True)
class WhitenStep:
    """TAROT whitening of a pool and a target feature set into ``output`` and ``output/targets``.

    Feng et al., TAROT (ICML 2025, arXiv 2412.00420), docs/methods/gradient-features.md §9. Reads
    ``pool`` (aligned to this step's rows) and ``target`` from the run's feature store, whitens them
    jointly (relative ridge; all-zero rows left out, see :func:`whiten_sets`) and stores the
    whitened, row-normalised sets. Keeps every row; rows whose pool feature is zero get the
    reason-free extra column ``whiten_zero`` = True.
    """

    name: ClassVar[str] = "whiten"
    pool: str = "grad/sgd"
    target: str = "grad/sgd/targets"
    output: str = "grad/whitened"
    ridge: float = 1e-3
    ridge_mode: str = "relative"

    def __post_init__(self) -> None:
        for pname in ("pool", "target", "output"):
            value = getattr(self, pname)
            if not isinstance(value, str) or not value:
                raise param_error("whiten", pname, "a feature name", value)
        r = self.ridge
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not np.isfinite(r) or r < 0:
            raise param_error("whiten", "ridge", "a finite number >= 0", r)
        if self.ridge_mode not in RIDGE_MODES:
            raise param_error("whiten", "ridge_mode", f"one of {RIDGE_MODES}", self.ridge_mode)

    def apply(self, table: pl.DataFrame, ctx: Any) -> pl.DataFrame:
        from curate.io.store import cache_key

        uids = table["uid"].to_list()
        pool = ctx.features[self.pool].subset(uids)
        target = ctx.features[self.target]
        key = cache_key(uids + list(target.uids), {
            "pool_key": pool.meta.get("cache_key"), "target_key": target.meta.get("cache_key"),
            "pool": self.pool, "target": self.target, "ridge": self.ridge, "ridge_mode": self.ridge_mode})
        out_name, tname = self.output, f"{self.output}/targets"
        cached = ctx.features.get(out_name, key)
        if cached is not None and ctx.features.get(tname, key) is not None:
            zero = ~np.any(np.asarray(cached.align(uids)) != 0, axis=1)
        else:
            wd, wq, zero = whiten_sets(pool, target, ridge=self.ridge, ridge_mode=self.ridge_mode,
                                       name=out_name, target_name=tname)
            wd.meta["cache_key"] = key
            wq.meta["cache_key"] = key
            ctx.features.put(wd)
            ctx.features.put(wq)
        ctx.stats["whiten"] = {"name": out_name, "targets": tname, "n_rows": len(uids),
                               "n_targets": len(target), "n_zero_rows": int(zero.sum())}
        return pl.DataFrame({"uid": uids, "keep": [True] * len(uids), "reason": [""] * len(uids),
                             "whiten_zero": zero.tolist()},
                            schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8, "whiten_zero": pl.Boolean})
