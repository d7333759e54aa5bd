"""``curate select``: run one selector on files, as an in-memory recipe, into a run folder.

:func:`select_files` does all the work so that the click command in ``curate/cli/__init__.py`` is a thin
wrapper (parse options, call, print the summary, map errors to exit code 2). The outputs are those
of every run (:mod:`curate.pipeline.outcome`): curated, rejected and selection parquet, manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from curate.errors import MissingFeatureError, RecipeError
from curate.io.store import FeatureSet
from curate.selectors.base import Budget


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``["alpha=0.5", "mode=otm", "checkpoint_weights=[1, 2]"]`` → dict (values read as YAML)."""
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--param expects KEY=VALUE, got {p!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _group_values(option: str, pairs: Sequence[str]) -> dict[str, float] | None:
    """``["alpaca=0.6", "code=0.4"]`` (or ``["alpaca=0.6,code=0.4"]``) -> {group: number}."""
    out: dict[str, float] = {}
    for item in pairs:
        for part in (p for p in str(item).split(",") if p.strip()):
            key, sep, value = part.rpartition("=")
            try:
                if not sep or not key.strip():
                    raise ValueError
                out[key.strip()] = float(value)
            except ValueError:
                raise RecipeError(f"{option} expects GROUP=NUMBER (e.g. {option} alpaca=0.6), got {part!r}.") from None
    return out or None


def parse_budget(budget: Any, *, by: str | None = None, ratios: Sequence[str] = (), mins: Sequence[str] = (),
                 maxs: Sequence[str] = (), overshoot: bool = False) -> Budget:
    """The :class:`Budget` of ``curate select`` / ``curate mix`` options.

    ``--budget`` keeps its forms (``0.1``, ``500``, ``tokens:2e6``, ``n:500``) and may also be a
    YAML/JSON mapping (``{tokens: 2e6, by: source, ratios: {alpaca: 0.6, code_alpaca: 0.4}}``);
    ``--by COLUMN`` with ``--ratio GROUP=SHARE`` / ``--min GROUP=SHARE`` / ``--max GROUP=SHARE``
    (repeatable or comma-separated; ``*`` = every other group) stratifies it, ``--overshoot`` lets
    a token budget keep the row that crosses it.

    Raises:
        RecipeError: a malformed option or an invalid budget (exit code 2 in the CLI).
    """
    groups = {"ratios": _group_values("--ratio", ratios), "min": _group_values("--min", mins),
              "max": _group_values("--max", maxs)}
    try:
        base = Budget.parse(budget)
        if by is None and not any(groups.values()) and not overshoot:
            return base
        spec = base.describe()
        spec.update({k: v for k, v in groups.items() if v})
        if by is not None:
            spec["by"] = by
        if overshoot:
            spec["overshoot"] = True
        return Budget.parse(spec)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc


def _store_sets(folder: Path) -> dict[str, Path]:
    """Feature-set name -> folder for every set directly inside the store ``folder`` (sorted by folder)."""
    out: dict[str, Path] = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if (d / "values.npy").exists():
            out[_set_name(d)] = d
    return out


def resolve_feature_set(folder: str | os.PathLike[str], **options: Any) -> FeatureSet:
    """The feature set of :func:`resolve_feature_folder` (same keyword options), loaded (memory-mapped)."""
    return FeatureSet.load(resolve_feature_folder(folder, **options))


def resolve_feature_folder(
    folder: str | os.PathLike[str],
    *,
    names: Sequence[str] = (),
    target: bool = False,
    pool_name: str | None = None,
    label: str = "--features",
    choose: str | None = None,
) -> Path:
    """The folder of the one feature set that a feature-folder argument (``--features``, ``--target-features``,
    ``--scores``, ``curate whiten FEAT_DIR``) stands for.

    ``folder`` is either a feature-set folder (``values.npy``, ``uids.parquet``, ``meta.json``
    inside, e.g. ``feats/embed__prompt``), used as it is, or a store folder holding such sets
    (what ``curate embed -o feats/`` or a recipe run's ``features/`` writes). In a store, the
    first of ``names`` present wins; failing that:

    * pool side (``target=False``): the store's only set whose name does not end in ``/targets``;
    * target side: the store's only set; else ``<pool_name>/targets``; else ``<name>/targets``
      where ``<name>`` is the store's only pool-side set (a recipe store holds both).

    Raises:
        MissingFeatureError: ``folder`` does not exist, holds no feature set, or holds several
            candidate sets and none of ``names``; the message lists the sets and the folder of one
            of them to point at instead (and ``choose``, an option that picks a set by name).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFeatureError(f"{label} folder {folder} does not exist.")
    if (folder / "values.npy").exists():
        return folder
    sets = _store_sets(folder)
    if not sets:
        raise MissingFeatureError(f"{label} folder {folder} holds no feature set (no values.npy in it or in a "
                                  "subfolder); write one with `curate embed` / `curate gradients`.")
    for name in names:
        if name in sets:
            return sets[name]
    pool_side = [n for n in sets if not n.endswith("/targets")]
    if not target and len(pool_side) == 1:
        return sets[pool_side[0]]
    if target:
        tries = [next(iter(sets))] if len(sets) == 1 else []
        tries += [f"{pool_name}/targets"] if pool_name else []
        tries += [f"{pool_side[0]}/targets"] if len(pool_side) == 1 else []
        for name in tries:
            if name in sets:
                return sets[name]
    side = "target" if target else "pool"
    side_sets = [n for n in sets if n.endswith("/targets")] if target else pool_side
    example = sets[(side_sets or list(sets))[0]]
    msg = f"{label} {folder} is a feature store with {len(sets)} feature set(s) {list(sets)}"
    msg += f", none of them {' or '.join(map(repr, names))}" if names else ""
    msg += (f", so it does not say which {side} set to use. Point {label} at one set's folder, "
            f"e.g. {label} {example}") + (f", or choose one with {choose}." if choose else ".")
    raise MissingFeatureError(msg)


def _load_features(folder: str | os.PathLike[str], roles: Sequence[str], defaults: Mapping[str, str],
                   label: str, pool_names: Mapping[str, str] | None = None) -> dict[str, Path]:
    """The feature-set folder of every role in ``roles`` from ``folder`` (:func:`resolve_feature_folder`):
    a feature-set folder fills them all; in a store each role takes its default feature name
    (``defaults``), the role name, or the store's one candidate set. ``pool_names`` (pool role -> the
    set name it got) lets ``target_<role>`` find ``<name>/targets``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFeatureError(f"{label} folder {folder} does not exist.")
    out: dict[str, Path] = {}
    for role in roles:
        target = role.startswith("target_")
        names = [n for n in (defaults.get(role), role) if n]
        pool_name = (pool_names or {}).get(role[len("target_"):]) if target else None
        out[role] = resolve_feature_folder(folder, names=names, target=target, pool_name=pool_name, label=label)
    return out


def _set_name(folder: Path) -> str:
    meta = folder / "meta.json"
    return str(json.loads(meta.read_text()).get("name", folder.name)) if meta.exists() else folder.name


def select_files(
    name: str,
    input_path: str | os.PathLike[str] | pl.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    budget: Any,
    features: str | os.PathLike[str] | None = None,
    target_features: str | os.PathLike[str] | None = None,
    target: str | os.PathLike[str] | pl.DataFrame | None = None,
    scores: str | os.PathLike[str] | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    tokenizer: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run selector ``name`` on a canonical table into the run folder ``out_dir``; returns the manifest.

    The call is the in-memory recipe ``[count_tokens (with tokenizer), <name>]`` run by the recipe
    runner (:func:`curate.pipeline.verbs.run_verb`), so its folder has the layout of ``curate run``:
    ``curated.parquet`` (input columns plus the steps' columns), ``rejected.parquet`` (``step``,
    ``reason``), ``selection.parquet`` (every candidate's uid, score, keep, rank, reason and the
    selector's extra columns) and ``manifest.json`` (its ``selection`` block: selector, parameters,
    budget, rows kept, feature sets, diagnostics). The feature folders are resolved to one feature
    set per role (:func:`resolve_feature_folder`) and enter the cache key by content.

    ``tokenizer`` (a tokenizer folder, a cached Hub id or ``default``) counts every row's tokens
    first (the ``count_tokens`` step), which token budgets then spend; the manifest's ``tokens``
    block names the tokenizer (or ``approximate`` for the word estimate) and the curated token
    count. Nothing is written when the budget's quotas cannot be met.

    Raises:
        RecipeError: unknown selector or parameter, bad budget or value (exit code 2 in the CLI).
        MissingFeatureError / SchemaError: missing features, mismatched target dimensions.
    """
    from curate.pipeline.verbs import run_verb
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
    roles = sel.required_features()
    pool_roles = [r for r in roles if not r.startswith("target_") and r != "scores"]
    target_roles = [r for r in roles if r.startswith("target_")]
    feats: dict[str, Path] = {}
    if features is not None:
        feats.update(_load_features(features, pool_roles, cls.default_features, "--features"))
    if target_features is not None:
        feats.update(_load_features(target_features, target_roles, cls.default_features, "--target-features",
                                    pool_names={r: _set_name(p) for r, p in feats.items()}))
    if scores is not None:
        feats.update(_load_features(scores, ["scores"], {}, "--scores"))
    steps: list[dict[str, Any]] = []
    if tokenizer is not None:
        steps.append({"use": "count_tokens", "tokenizer": None if tokenizer == "default" else tokenizer})
    steps.append({"use": name, **params, "budget": bud.describe(),
                  **({"features": {r: str(p.resolve()) for r, p in feats.items()}} if feats else {})})
    return run_verb("select", input_path, steps, out_dir, targets=target, seed=seed, progress=progress).manifest
