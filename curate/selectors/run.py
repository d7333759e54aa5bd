"""``curate select``: run one selector on files and write the run outputs (issue 6 "CLI contract").

:func:`select_files` does all the work so that the click command in ``curate/cli.py`` is a thin
wrapper (parse options, call, print the summary, map errors to exit code 2):

OUT_DIR/curated.parquet   kept rows (the input columns), in input order
OUT_DIR/rejected.parquet  dropped rows plus ``reason``
OUT_DIR/selection.parquet every candidate's uid/score/keep/rank/reason and extra columns
OUT_DIR/manifest.json     selector, params, budget, seed, inputs with sha256, diagnostics
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from curate.errors import MissingFeatureError, RecipeError
from curate.features.store import FeatureSet, FeatureStore
from curate.selectors.base import Budget, Selection


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``["alpha=0.5", "mode=otm", "checkpoint_weights=[1, 2]"]`` → dict (values read as YAML)."""
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--param expects KEY=VALUE, got {p!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _load_features(folder: str | os.PathLike[str], roles: Sequence[str], defaults: Mapping[str, str],
                   label: str) -> dict[str, FeatureSet]:
    """A feature-set folder (``values.npy`` inside) fills the first of ``roles``; a store root
    fills every role by its default feature name or by the role name."""
    folder = Path(folder)
    if not folder.exists():
        raise MissingFeatureError(f"{label} folder {folder} does not exist.")
    if (folder / "values.npy").exists():
        return {roles[0]: FeatureSet.load(folder)} if roles else {}
    store = FeatureStore(folder)
    out = {}
    for role in roles:
        for name in (defaults.get(role), role):
            if name and name in store:
                out[role] = store[name]
                break
    return out


def select_files(
    name: str,
    input_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    budget: Any,
    features: str | os.PathLike[str] | None = None,
    target_features: str | os.PathLike[str] | None = None,
    target: str | os.PathLike[str] | None = None,
    scores: str | os.PathLike[str] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Selection, dict[str, Any]]:
    """Run selector ``name`` on a canonical parquet table and write the outputs to ``out_dir``.

    Raises:
        RecipeError: unknown selector or parameter, bad budget or value (exit code 2 in the CLI).
        MissingFeatureError / SchemaError: missing features, mismatched target dimensions.
    """
    from curate.io.writers import sha256_file, write_json, write_parquet
    from curate.selectors import get_selector

    cls = get_selector(name)
    params = dict(params or {})
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise RecipeError(f"unknown parameter(s) {unknown} for selector '{name}'. Valid parameters: {sorted(valid) or 'none'}.")
    if scores is not None and "source" in valid:
        params.setdefault("source", "scores")
    try:
        sel = cls(**params)
        bud = Budget.parse(budget)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc
    table = pl.read_parquet(input_path)
    roles = sel.required_features()
    pool_roles = [r for r in roles if not r.startswith("target_") and r != "scores"]
    target_roles = [r for r in roles if r.startswith("target_")]
    feats: dict[str, FeatureSet] = {}
    if features is not None:
        feats.update(_load_features(features, pool_roles, cls.default_features, "--features"))
    if target_features is not None:
        feats.update(_load_features(target_features, target_roles, cls.default_features, "--target-features"))
    if scores is not None:
        feats.update(_load_features(scores, ["scores"], {}, "--scores"))
    targets = pl.read_parquet(target) if target is not None else None
    res = sel.select(table, feats, bud, seed=seed, targets=targets)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    joined = table.join(res.frame.select("uid", "keep", "reason", "rank"), on="uid", how="left", maintain_order="left")
    write_parquet(res.frame, out / "selection.parquet")
    write_parquet(joined.filter(pl.col("keep")).drop("keep", "reason", "rank"), out / "curated.parquet")
    write_parquet(joined.filter(~pl.col("keep")).drop("keep", "rank"), out / "rejected.parquet")
    inputs = {"input": {"path": str(input_path), "sha256": sha256_file(input_path)}}
    for label, p in (("target", target),):
        if p is not None:
            inputs[label] = {"path": str(p), "sha256": sha256_file(p)}
    for label, p in (("features", features), ("target_features", target_features), ("scores", scores)):
        if p is not None:
            inputs[label] = {"path": str(p)}
    manifest = {
        "command": "select", "selector": name, "params": res.params, "budget": bud.describe(), "seed": seed,
        "inputs": inputs, "n_rows": table.height, "n_kept": res.n_kept, "diagnostics": res.diagnostics,
        "outputs": ["curated.parquet", "rejected.parquet", "selection.parquet", "manifest.json"],
    }
    write_json(manifest, out / "manifest.json")
    return res, manifest
