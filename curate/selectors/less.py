"""LESS: targeted selection by gradient-feature influence (docs/methods/less-bids.md Part A)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from curate.errors import param_error
from curate.selectors._influence import Influence, task_groups
from curate.selectors.base import BaseSelector, Choice, SelectContext, check_choice, stable_topk

SOURCES = ("grads", "scores")


def check_weights(owner: str, value: Any) -> tuple[float, ...] | None:
    """Validate ``checkpoint_weights``: None or a non-empty list of finite numbers > 0."""
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0 for v in value)
    if not ok:
        raise param_error(owner, "checkpoint_weights", "None or a non-empty list of numbers > 0", value)
    return tuple(float(v) for v in value)


def thi_counts(group_sums: np.ndarray, names: list[str]) -> dict[str, int]:
    """THI (paper BIDS §3): per task, how many selected rows have it as argmax_k Σ_{j∈V_k} A_ij
    (ties to the smaller task name, since ``names`` is sorted)."""
    best = np.argmax(group_sums, axis=1) if len(group_sums) else np.zeros(0, dtype=np.int64)
    counts = np.bincount(best, minlength=len(names))
    return {t: int(c) for t, c in zip(names, counts, strict=False)}


@dataclass(frozen=True, kw_only=True)
class LessSelector(BaseSelector):
    """LESS influence scores with task-max aggregation, then top-p.

    Xia et al., "LESS: Selecting Influential Data for Targeted Instruction Tuning", ICML 2024,
    arXiv 2402.04333 (code ``princeton-nlp/LESS``). A = Σ_c w_c Φ_c Ψ_cᵀ from L2-normalised
    gradient features (pool role ``grads``, Adam variant; target role ``target_grads``, SGD
    variant), or a precomputed (N, M) matrix (role ``scores``, e.g. EK-FAC influence, with meta
    ``target_uids``). Aggregations: ``task_max`` (mean within each target task, max over tasks),
    ``instance_max`` (max over targets), ``sum``.

    Deviations: tasks are grouped by the targets' ``task`` label, not the reference's hard-coded
    reshape (identical for contiguous equal-size subtasks; also handles unequal groups); ties go
    to the smaller uid; ``task_max`` never forms the N×M matrix (mean of dot = dot with mean).
    """

    name: ClassVar[str] = "less"
    requires: ClassVar[tuple[str, ...]] = ("grads", "target_grads")
    default_features: ClassVar[dict[str, str]] = {"grads": "grad/adam", "target_grads": "grad/sgd/targets"}
    default_budget: ClassVar[Any] = 0.05
    aggregation: str = "task_max"
    source: str = "grads"
    checkpoint_weights: tuple[float, ...] | None = None
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("aggregation", "mean"), ("source", "ekfac"), ("checkpoint_weights", (1.0, -1.0)),
    )

    def __post_init__(self) -> None:
        check_choice("LESS", "aggregation", self.aggregation, ("task_max", "instance_max", "sum"))
        check_choice("LESS", "source", self.source, SOURCES)
        object.__setattr__(self, "checkpoint_weights", check_weights("LESS", self.checkpoint_weights))

    def required_features(self) -> tuple[str, ...]:
        return ("scores",) if self.source == "scores" else self.requires

    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        inf = Influence(ctx, self.source, self.checkpoint_weights)
        names, groups, col_task = task_groups(ctx, inf.target_uids)
        sizes = np.array([len(g) for g in groups], dtype=np.float64)
        means = inf.group_means(ctx.n, groups)  # (N, K)
        if self.aggregation == "task_max":
            score = means.max(axis=1)
            best = np.array(names, dtype=object)[np.argmax(means, axis=1)]
        else:
            score = np.empty(ctx.n)
            best = np.empty(ctx.n, dtype=object)
            for s, e, a in inf.chunks(ctx.n):
                if self.aggregation == "instance_max":
                    score[s:e] = a.max(axis=1)
                    best[s:e] = col_task[np.argmax(a, axis=1)]
                else:
                    score[s:e] = a.sum(axis=1)
                    best[s:e] = np.array(names, dtype=object)[np.argmax(means[s:e] * sizes, axis=1)]
        order = stable_topk(score, k)
        diag = {
            "n_targets": inf.m, "tasks": names,
            "thi": thi_counts((means * sizes)[order], names),
        }
        return Choice(order=order, score=score, extra={"best_task": best.tolist()}, diagnostics=diag)
