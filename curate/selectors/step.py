"""Pipeline steps for selectors: one registered step per selector (``use: bids`` in a recipe).

Each step is a frozen keyword-only dataclass with the selector's parameters plus

- ``budget``: int → n rows, float in (0, 1] → fraction, or a mapping ``{n|fraction|tokens: v}``
  (or ``"tokens:2e6"``);
- ``features``: mapping role → feature name in ``ctx.features`` (defaults per selector, e.g.
  ``{"grads": "grad/adam", "target_grads": "grad/sgd/targets"}``) or the absolute path of a
  feature-set folder made elsewhere (the key then hashes the folder's content).

``apply`` returns ``uid, keep, reason, score, rank`` (+ the selector's extra columns) per row;
the Selection diagnostics go to ``ctx.stats["selection"]`` (stats.json).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import polars as pl

from curate.errors import MissingFeatureError, param_error
from curate.io.store import FeatureSet, external_set_folder
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.selectors.base import BaseSelector, Budget


class SelectorStep:
    """Base of the generated selector steps (see :func:`make_step`)."""

    selector_cls: type[BaseSelector]

    def _selector_params(self) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(self.selector_cls) if f.init}
        return {k: getattr(self, k) for k in names}

    def _validate(self) -> None:
        owner = f"step '{self.selector_cls.name}'"
        try:
            budget = Budget.parse(self.budget)  # type: ignore[attr-defined]
        except ValueError as exc:  # keep the specific rule (e.g. ratios that do not sum to 1)
            raise param_error(owner, "budget", f"an int >= 1, a float in (0, 1] or {{n|fraction|tokens: v, by: ..., "
                              f"ratios | min | max: ...}} ({exc})", self.budget) from exc  # type: ignore[attr-defined]
        feats = self.features  # type: ignore[attr-defined]
        if feats is not None and (
            not isinstance(feats, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in feats.items())
        ):
            raise param_error(owner, "features", "a mapping of role -> feature name", feats)
        sel = self.selector_cls(**self._selector_params())
        unknown = sorted(set(feats or {}) - set(sel.required_features()))
        if unknown:
            raise param_error(owner, "features", f"keyed by the roles {list(sel.required_features())}", dict(feats))
        object.__setattr__(self, "_budget", budget)
        object.__setattr__(self, "_selector", sel)

    def feature_names(self) -> dict[str, str]:
        sel: BaseSelector = self._selector  # type: ignore[attr-defined]
        names = dict(self.selector_cls.default_features)
        names.update(self.features or {})  # type: ignore[attr-defined]
        return {role: names.get(role, role) for role in sel.required_features()}

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        sel: BaseSelector = self._selector  # type: ignore[attr-defined]
        feats = {}
        for role, fname in self.feature_names().items():
            folder = external_set_folder(fname)
            fs = FeatureSet.load(folder) if folder is not None else ctx.features.get(fname)
            if fs is None:
                raise MissingFeatureError(
                    f"step '{sel.name}': feature '{fname}' (role '{role}') is not in the run's feature store "
                    f"{ctx.features.root}; known: {ctx.features.names()}. Add a feature step before it or map the "
                    f"role with features: {{{role}: NAME}}."
                )
            feats[role] = fs
        res = sel.select(table, feats, self._budget, seed=ctx.seed, targets=ctx.targets)  # type: ignore[attr-defined]
        ctx.stats["selection"] = {"params": res.params, "budget": self._budget.describe(),  # type: ignore[attr-defined]
                                  "features": {role: fs.name for role, fs in feats.items()},
                                  "diagnostics": res.diagnostics}
        return res.frame



def make_step(cls: type[BaseSelector]) -> type:
    """Generate and register the pipeline step of selector ``cls`` under ``cls.name``."""
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else dataclasses.field(
            default_factory=f.default_factory)  # type: ignore[arg-type]
        fields.append((f.name, f.type, default))
    fields.append(("budget", Any, cls.default_budget))
    fields.append(("features", Any, None))
    step_cls = dataclasses.make_dataclass(
        f"{cls.__name__}Step", fields, bases=(SelectorStep,), frozen=True, kw_only=True,
        namespace={
            "selector_cls": cls,
            # the selector's file parameters resolve against the recipe folder (curate.pipeline.recipe)
            "path_params": getattr(cls, "path_params", ()),
            "path_or_name_params": getattr(cls, "path_or_name_params", ()),
            "__post_init__": lambda self: self._validate(),
            "__doc__": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else cls.name,
            "__module__": __name__,
        },
    )
    return register_step(cls.name)(step_cls)
