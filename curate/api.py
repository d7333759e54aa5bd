"""The notebook face: ``curate.dedup``, ``curate.filter``, ``curate.select``, ``curate.embed`` and
``curate.run_steps``.

Each function takes a table (a canonical polars DataFrame, or any source file or folder the readers
understand) and runs the same in-memory recipe as the matching CLI verb
(:func:`curate.pipeline.verbs.run_verb`), so a notebook, a verb and a YAML recipe with the same
steps give the same rows. They return an :class:`~curate.pipeline.verbs.Outcome` (curated,
rejected, selection, manifest, and ``run_dir`` when ``out`` names a folder to keep)::

    import curate
    pool = curate.read_sources(["alpaca.json"]).table
    clean = curate.dedup(pool, minhash=True).curated
    picked = curate.select(clean, "rds", budget=0.05, targets="gsm8k/test.jsonl")
    picked.curated, picked.selection.sort("rank")

``select`` computes the embeddings a selector needs (``embed/<field>`` roles: RDS+, TAROT,
k-center, DEITA, Quad, CritiQ) with MiniLM unless ``features`` gives them; gradient features (LESS,
BIDS) come from ``curate gradients`` / a recipe and are passed as folders.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import MissingFeatureError
from curate.io.store import FeatureSet, FeatureStore
from curate.pipeline.verbs import Outcome, Source, run_in_memory


def run_steps(data: Source, steps: Sequence[Mapping[str, Any]], *, targets: Any = None, seed: int = 0,
              out: str | os.PathLike[str] | None = None, name: str = "steps") -> Outcome:
    """Run recipe steps (``[{"use": "exact_dedup", "level": "pair"}, ...]``) on ``data``."""
    return run_in_memory(name, data, steps, targets=targets, seed=seed, out_dir=out)


def dedup(data: Source, *, exact: str | None = "pair", minhash: bool = False, semantic: bool = False,
          field: str = "prompt+response", threshold: float = 0.8, eps: float = 0.05, model: str = "default",
          out: str | os.PathLike[str] | None = None) -> Outcome:
    """Exact (``exact``: ``prompt | response | pair``; None for none), MinHash-LSH (Jaccard >=
    ``threshold`` on word 5-grams) and semantic (cosine >= 1 - ``eps``) dedup, in that order."""
    steps: list[dict[str, Any]] = []
    if exact is not None:
        steps.append({"use": "exact_dedup", "level": exact})
    if minhash:
        steps.append({"use": "minhash_dedup", "field": field, "threshold": threshold})
    if semantic:
        steps.append({"use": "semantic_dedup", "field": field, "eps": eps, "model": model})
    return run_in_memory("dedup", data, steps, out_dir=out)


def filter(data: Source, *, out: str | os.PathLike[str] | None = None, **rules: Any) -> Outcome:  # noqa: A001
    """Heuristic quality filters (``curate list steps`` shows the rules, e.g. ``max_chars=20000``)."""
    return run_in_memory("filter", data, [{"use": "filter", **rules}], out_dir=out)


def embed(data: Source, *, field: str = "prompt+response", model: str = "default",
          out: str | os.PathLike[str] | None = None) -> FeatureSet:
    """Embeddings of ``field`` for every row (``values`` aligned with ``uids``), MiniLM by default.

    The vectors are read into memory unless ``out`` keeps the run folder (then memory-mapped)."""
    step = {"use": "embed", "field": field, "model": model}
    if out is not None:
        run_in_memory("embed", data, [step], out_dir=out)
        return _embedded(Path(out), field)
    with tempfile.TemporaryDirectory(prefix="curate-embed-") as tmp:
        run_in_memory("embed", data, [step], out_dir=tmp)
        fs = _embedded(Path(tmp), field)
        return FeatureSet(fs.name, fs.uids, np.array(fs.values), fs.meta)  # read before the folder goes


def _embedded(run_dir: Path, field: str) -> FeatureSet:
    fs = FeatureStore(run_dir / "features").get(f"embed/{field}")
    if fs is None:  # pragma: no cover - the embed step always writes its set
        raise MissingFeatureError(f"the embed step wrote no feature set embed/{field} in {run_dir}.")
    return fs


def select(data: Source, method: str, *, budget: Any, targets: Any = None,
           features: Mapping[str, str | os.PathLike[str] | FeatureSet] | None = None, seed: int = 0,
           embed_model: str = "default", out: str | os.PathLike[str] | None = None, **params: Any) -> Outcome:
    """Select a ``budget`` (rows, a fraction, ``"tokens:2e6"`` or a stratified mapping) of ``data``
    with selector ``method`` (``curate list selectors``); ``params`` are its parameters.

    Args:
        targets: target rows (a file, folder or DataFrame; several as a list) for targeted selectors.
        features: role -> a feature-set folder or a :class:`FeatureSet` (roles the selector does not
            use are ignored); roles of the form ``embed/<field>`` not given here are embedded
            with ``embed_model`` first.

    Raises:
        RecipeError: unknown selector or parameter, bad budget.
        MissingFeatureError: a role that is neither given nor an embedding (gradient features).
    """
    from curate.selectors import get_selector

    cls = get_selector(method)
    roles = cls(**params).required_features()
    given = dict(features or {})
    keep: list[tempfile.TemporaryDirectory[str]] = []
    feats: dict[str, str] = {}
    for role, value in given.items():
        if role not in roles:  # one features mapping can serve several selectors
            continue
        if isinstance(value, FeatureSet):  # the recipe reads feature sets from folders
            tmp = tempfile.TemporaryDirectory(prefix="curate-feature-")
            keep.append(tmp)
            value.save(Path(tmp.name) / "set")
            value = Path(tmp.name) / "set"
        feats[role] = str(Path(value).resolve())
    steps: list[dict[str, Any]] = []
    fields: dict[str, bool] = {}
    for role in roles:
        if role in feats:
            continue
        name = cls.default_features.get(role, role)
        parts = name.split("/")
        if parts[0] != "embed" or len(parts) not in (2, 3):
            raise MissingFeatureError(
                f"selector '{method}' needs the feature '{name}' (role '{role}'), which curate.select does not "
                f"compute; make it with `curate gradients` / a recipe and pass features={{'{role}': FOLDER}}.")
        fields[parts[1]] = fields.get(parts[1], False) or len(parts) == 3
    for field, with_targets in fields.items():
        steps.append({"use": "embed", "field": field, "model": embed_model, "targets": with_targets})
    steps.append({"use": method, **params, "budget": budget, **({"features": feats} if feats else {})})
    try:
        return run_in_memory("select", data, steps, targets=targets, seed=seed, out_dir=out)
    finally:
        for tmp in keep:
            tmp.cleanup()


__all__ = ["Outcome", "dedup", "embed", "filter", "run_steps", "select"]
