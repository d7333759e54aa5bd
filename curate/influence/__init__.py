"""Influence functions: curvature (identity, diagonal, K-FAC, EK-FAC), pairwise scores, low-rank
queries and a TF-IDF prefilter (docs/methods/ekfac.md).

Importing this package is light; torch is imported when one of the names below is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Curvature": "curate.influence.curvature",
    "LayerFactors": "curate.influence.curvature",
    "Task": "curate.influence.task",
    "CausalLMTask": "curate.influence.task",
    "ScoreMatrix": "curate.influence.scores",
    "example_gradients": "curate.influence.scores",
    "precondition_examples": "curate.influence.scores",
    "pairwise_scores": "curate.influence.scores",
    "self_scores": "curate.influence.scores",
    "tfidf_topk": "curate.influence.tfidf",
    "select_modules": "curate.features.capture",
    "fit_table": "curate.influence.api",
    "score_tables": "curate.influence.api",
    "save_scores": "curate.influence.api",
    "InfluenceScoresStep": "curate.influence.steps",
}

__all__ = sorted(_EXPORTS)

from curate.influence import steps as _steps  # noqa: E402,F401 - registers the recipe steps (no torch import)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'curate.influence' has no attribute {name!r}")
