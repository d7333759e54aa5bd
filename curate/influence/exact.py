"""Exact references for tiny models: per-example gradients by a for-loop over examples and the
explicit damped (block-diagonal) Fisher / Gauss-Newton matrix. Used by the tests only; the cost is
O(N·P²) memory-free but P² memory per block, so keep the models tiny.

The gradient of each tracked module is taken with ``torch.autograd.grad`` on its parameters
(weight, then bias as the last column, GPT-2 ``Conv1D`` weights transposed), one example at a time,
so it shares no code with the hook-based path it checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from curate._lazy import require
from curate.features.capture import is_conv1d
from curate.influence.task import Task

torch = require("torch", "influence functions")


def per_example_grads(
    model: Any, task: Task, examples: Sequence[Any], names: Sequence[str], *, sampled: bool = False,
    generator: Any = None,
) -> dict[str, Any]:
    """module name -> (N, d_out · (d_in+1)) float64, row-major vec of [W | b] per example."""
    mods = dict(model.named_modules())
    out: dict[str, list[Any]] = {n: [] for n in names}
    for ex in examples:
        batch = task.collate([ex])
        loss = task.sampled_loss(model, batch, generator) if sampled else task.loss(model, batch)
        params = []
        for n in names:
            params.append(mods[n].weight)
            if mods[n].bias is not None:
                params.append(mods[n].bias)
        grads = iter(torch.autograd.grad(loss, params, allow_unused=True))
        for n in names:
            w = mods[n].weight
            gw = next(grads)
            gw = torch.zeros_like(w) if gw is None else gw
            if is_conv1d(mods[n]):
                gw = gw.T
            cols = [gw.double()]
            if mods[n].bias is not None:
                gb = next(grads)
                gb = torch.zeros_like(mods[n].bias) if gb is None else gb
                cols.append(gb.double()[:, None])
            out[n].append(torch.cat(cols, 1).reshape(-1))
    return {n: torch.stack(v) for n, v in out.items()}


def fisher_blocks(grads: dict[str, Any]) -> dict[str, Any]:
    """F_ℓ = (1/N) Σ_n vec(G_n) vec(G_n)ᵀ per module (per sequence, like EK-FAC's Λ)."""
    return {n: g.T @ g / g.shape[0] for n, g in grads.items()}


def exact_scores(
    fisher: dict[str, Any], query_grads: dict[str, Any], train_grads: dict[str, Any], damping: dict[str, float],
) -> Any:
    """Σ_ℓ v_qᵀ (F_ℓ + λ_ℓ I)⁻¹ g_n, (M, N) float64 (block-diagonal inverse)."""
    total = 0
    for n, f in fisher.items():
        eye = torch.eye(f.shape[0], dtype=f.dtype)
        sol = torch.linalg.solve(f + damping[n] * eye, query_grads[n].T)  # (P, M)
        total = total + sol.T @ train_grads[n].T
    return total
