"""Recipe step ``influence_scores``: EK-FAC influence of every candidate on the recipe's targets.

Grosse et al., "Studying Large Language Model Generalization with Influence Functions" (arXiv
2308.03296); docs/methods/ekfac.md. The step fits factors on the candidate rows (or loads a folder from
``curate influence fit``), scores them against ``ctx.targets`` and writes the (candidates × targets)
feature set ``scores`` (meta ``target_uids``) to ``ctx.features``, where LESS / BIDS read it with
``source: scores``. It keeps every row; ``score`` is the mean influence over the targets.
torch is imported inside :meth:`InfluenceScoresStep.apply` only.

Deviation: TF-IDF-filtered pairs stay NaN in the feature set (docs/methods/ekfac.md §11); selectors that require
finite scores then refuse them, so use ``tfidf_top`` only with consumers that handle NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import polars as pl

from curate.errors import MissingFeatureError, param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext

_STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def _pos_int(owner: str, name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise param_error(owner, name, f"{'None or ' if allow_none else ''}an integer >= 1", value)


@register_step("influence_scores")
@dataclass(frozen=True, kw_only=True)
class InfluenceScoresStep:
    """Influence scores (candidates × targets) as the feature set ``scores``; keeps every row.

    Attributes:
        model: ``"default"`` (SmolLM2-135M-Instruct) or a local HF folder.
        checkpoint: optional peft adapter / model folder applied to ``model``.
        factors: a folder from ``curate influence fit`` to reuse; None fits on this step's rows
            (saved under the step folder as ``factors``).
        strategy, modules, fisher, max_examples, seed: fit arguments (docs/methods/ekfac.md §1).
        damping: None (heuristic, 0.1 × mean eigenvalue) or an absolute float >= 0.
        query_rank: rank of the preconditioned target gradients (None = full rank).
        tfidf_top: score only each target's top-k candidates by TF-IDF (others NaN).
        normalize: ``none`` | ``by_n_train`` | ``cosine``.
        max_length, batch_size, query_batch_size, device: execution settings.
        feature: name of the feature set written to ``ctx.features``.
    """

    path_params: ClassVar[tuple[str, ...]] = ("factors",)
    path_or_name_params: ClassVar[tuple[str, ...]] = ("model", "checkpoint")
    model: str = "default"
    checkpoint: str | None = None
    factors: str | None = None
    strategy: str = "ekfac"
    modules: str = "mlp"
    fisher: str = "true"
    max_examples: int = 2000
    damping: float | None = None
    query_rank: int | None = None
    tfidf_top: int | None = None
    normalize: str = "none"
    max_length: int = 256
    batch_size: int = 4
    query_batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    feature: str = "scores"

    def __post_init__(self) -> None:
        o = "influence_scores"
        if self.strategy not in _STRATEGIES:
            raise param_error(o, "strategy", f"one of {_STRATEGIES}", self.strategy)
        if self.fisher not in ("true", "empirical"):
            raise param_error(o, "fisher", "'true' or 'empirical'", self.fisher)
        if self.normalize not in ("none", "by_n_train", "cosine"):
            raise param_error(o, "normalize", "'none', 'by_n_train' or 'cosine'", self.normalize)
        if not isinstance(self.modules, str) or not self.modules.strip():
            raise param_error(o, "modules", "'mlp', 'mlp+attn', 'all' or a comma list of module names", self.modules)
        if self.damping is not None and (isinstance(self.damping, bool) or not isinstance(self.damping, (int, float))
                                         or not self.damping >= 0):
            raise param_error(o, "damping", "None (heuristic) or a float >= 0", self.damping)
        for name in ("max_examples", "max_length", "batch_size", "query_batch_size"):
            _pos_int(o, name, getattr(self, name))
        for name in ("query_rank", "tfidf_top"):
            _pos_int(o, name, getattr(self, name), allow_none=True)
        if not isinstance(self.feature, str) or not self.feature:
            raise param_error(o, "feature", "a non-empty feature name", self.feature)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        import numpy as np

        from curate.influence.api import fit_table, score_tables
        from curate.io.store import cache_key
        from curate.pipeline.step import step_params

        if ctx.targets is None or ctx.targets.height == 0:
            raise MissingFeatureError("step 'influence_scores' needs the recipe's targets (add `targets:` to the recipe).")
        device = ctx.device if self.device == "auto" else self.device
        params = step_params(self)
        key = cache_key([*table["uid"].to_list(), "|", *ctx.targets["uid"].to_list()], params)
        fs = ctx.features.get(self.feature, key)
        if fs is None:
            folder = self.factors
            if folder is None:
                base = ctx.step_dir if ctx.step_dir is not None else ctx.features.root / "_influence"
                folder = str(fit_table(table, Path(base) / "factors", model=self.model, checkpoint=self.checkpoint,
                                       strategy=self.strategy, modules=self.modules, fisher=self.fisher,
                                       max_examples=self.max_examples, batch_size=self.batch_size,
                                       max_length=self.max_length, device=device, seed=self.seed))
            s = score_tables(table, ctx.targets, folder, model=None if self.factors else self.model,
                             checkpoint=None if self.factors else self.checkpoint,
                             damping="default" if self.damping is None else float(self.damping),
                             query_rank=self.query_rank, tfidf_top=self.tfidf_top, batch_size=self.batch_size,
                             max_length=self.max_length, device=device, normalize=self.normalize,
                             query_batch_size=self.query_batch_size)
            fs = s.to_feature_set(self.feature)
            fs.meta["cache_key"] = key
            ctx.features.put(fs)
            ctx.stats["influence"] = {"n_targets": len(s.query_uids), "n_candidates": len(s.train_uids),
                                      "pairs_scored": int(np.isfinite(s.values).sum())}
        vals = np.asarray(fs.align(table["uid"]), dtype=np.float64)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(vals, axis=1)
        return pl.DataFrame({"uid": table["uid"].to_list(), "keep": [True] * table.height,
                             "reason": [""] * table.height, "score": mean},
                            schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8, "score": pl.Float64})
