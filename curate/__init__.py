"""curate: data curation and selection for LLM post-training data.

The public API is re-exported here lazily, so ``import curate`` stays light (no torch, faiss,
sentence-transformers until a feature needs them).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # table
    "SCHEMA": "curate.schema",
    "uid": "curate.schema",
    "make_record": "curate.schema",
    "to_frame": "curate.schema",
    "validate_table": "curate.schema",
    "texts": "curate.schema",
    # errors
    "SchemaError": "curate.errors",
    "RecipeError": "curate.errors",
    "ParameterError": "curate.errors",
    "MissingFeatureError": "curate.errors",
    "MissingDependencyError": "curate.errors",
    # io
    "read_sources": "curate.io",
    "read_source": "curate.io",
    "write_parquet": "curate.io.writers",
    # features
    "FeatureSet": "curate.io.store",
    "FeatureStore": "curate.io.store",
    # pipeline
    "load_recipe": "curate.pipeline.recipe",
    "parse_recipe": "curate.pipeline.recipe",
    "run_recipe": "curate.pipeline.runner",
    "load_run": "curate.pipeline.results",
    "StepContext": "curate.pipeline.step",
    "register_step": "curate.pipeline.registry",
    "row_filter": "curate.pipeline.plugins",
    "STEPS": "curate.pipeline.registry",
    "embed_texts": "curate.features.embed",
    "embed_table": "curate.features.embed",
    "knn": "curate.features.index",
    "kmeans": "curate.features.index",
    "write_report": "curate.report",
    # notebook functions: the verbs as calls returning an Outcome
    "dedup": "curate.api",
    "filter": "curate.api",
    "select": "curate.api",
    "embed": "curate.api",
    "run_steps": "curate.api",
    "Outcome": "curate.api",
    # selectors
    "Budget": "curate.selectors",
    "Selection": "curate.selectors",
    "SELECTORS": "curate.selectors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'curate' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
