"""The LESS influence matrix A = Σ_c w_c Φ_c Ψ_cᵀ (docs/methods/less-bids.md A.1), shared by LESS and BIDS.

Gradient features come as one pool role (``grads``: (N, d) or (N, C, d) for C checkpoints) and
one target role (``target_grads``: (M, d) or (M, C, d)); rows are expected L2-normalised per
checkpoint, so each term is a cosine. Checkpoint weights w_c come from the selector's
``checkpoint_weights`` or the feature meta ``lr_weights`` (else 1 for every checkpoint). Alternatively a precomputed score matrix (EK-FAC influence)
comes as the pool role ``scores`` of shape (N, M) whose meta ``target_uids`` names the columns.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from curate.errors import SchemaError
from curate.io.store import FeatureSet
from curate.selectors.base import SelectContext

CHUNK_ELEMS = 2**24  # rows per chunk so that a chunk of A holds ~16M float64 values


def _as3(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[:, None, :] if x.ndim == 2 else x


class Influence:
    """Access to A without necessarily materialising it."""

    def __init__(self, ctx: SelectContext, source: str, checkpoint_weights: Sequence[float] | None) -> None:
        self.source = source
        if source == "scores":
            fs_meta = ctx.meta.get("scores", {})
            a = np.asarray(ctx.features["scores"], dtype=np.float64)
            tu = fs_meta.get("target_uids")
            if tu is None or len(tu) != a.shape[1]:
                tu = [f"target_{j}" for j in range(a.shape[1])]
            order = np.argsort(np.asarray(tu, dtype=str), kind="stable")
            self.a = a[:, order]
            self.target_uids = np.asarray(tu, dtype=object)[order]
            self.phi = self.psi = None
            self.w = np.ones(1)
        else:
            tgt: FeatureSet = ctx.features["target_grads"]
            self.phi = _as3(ctx.features["grads"])
            self.psi = _as3(tgt.values)
            if self.phi.shape[1:] != self.psi.shape[1:]:
                raise SchemaError("pool and target gradient features differ in shape.", field="target_grads",
                                  expected=str(self.phi.shape[1:]), found=str(self.psi.shape[1:]))
            c = self.phi.shape[1]
            w = checkpoint_weights if checkpoint_weights is not None else tgt.meta.get("lr_weights")
            w = np.ones(c) if w is None else np.asarray(w, dtype=np.float64)
            if w.shape != (c,):
                raise SchemaError("checkpoint weights do not match the features.", field="checkpoint_weights",
                                  expected=f"{c} weights", found=len(w))
            self.w = w
            self.target_uids = np.asarray(tgt.uids.tolist(), dtype=object)
            self.a = None

    @property
    def m(self) -> int:
        return len(self.target_uids)

    def chunks(self, n: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(start, stop, A[start:stop]) row chunks."""
        if self.a is not None:
            yield 0, n, self.a
            return
        step = max(1, CHUNK_ELEMS // max(self.m, 1))
        for s in range(0, n, step):
            yield s, min(n, s + step), self.rows(slice(s, min(n, s + step)))

    def rows(self, idx: Any) -> np.ndarray:
        if self.a is not None:
            return self.a[idx]
        phi = self.phi[idx]
        return np.einsum("c,icd,jcd->ij", self.w, phi, self.psi, optimize=True)

    def full(self, n: int) -> np.ndarray:
        return self.a if self.a is not None else self.rows(slice(0, n))

    def group_means(self, n: int, groups: list[np.ndarray]) -> np.ndarray:
        """(N, K) mean of A over each column group, computed as Φ·mean(Ψ_group) (no N×M matrix)."""
        if self.a is not None:
            return np.stack([self.a[:, g].mean(axis=1) for g in groups], axis=1)
        centers = np.stack([self.psi[g].mean(axis=0) for g in groups], axis=0)  # (K, C, d)
        return np.einsum("c,icd,kcd->ik", self.w, self.phi, centers, optimize=True)


def task_groups(ctx: SelectContext, target_uids: np.ndarray) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """(task names sorted, column index groups, per-column task) from the target table."""
    tasks = ctx.target_tasks(target_uids.tolist())
    names = sorted(set(tasks.tolist()))
    groups = [np.flatnonzero(tasks == t) for t in names]
    return names, groups, tasks
