"""``curate select``: run one selector on files and write the run outputs.

:func:`select_files` does all the work so that the click command in ``curate/cli.py`` is a thin
wrapper (parse options, call, print the summary, map errors to exit code 2):

OUT_DIR/curated.parquet   kept rows (the input columns), in input order
OUT_DIR/rejected.parquet  dropped rows plus ``reason``
OUT_DIR/selection.parquet every candidate's uid/score/keep/rank/reason and extra columns
OUT_DIR/manifest.json     selector, params, budget, seed, inputs with sha256, diagnostics
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
from curate.features.store import FeatureSet
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
            name = d.name
            if (d / "meta.json").exists():
                name = json.loads((d / "meta.json").read_text()).get("name", d.name)
            out[str(name)] = d
    return out


def resolve_feature_set(
    folder: str | os.PathLike[str],
    *,
    names: Sequence[str] = (),
    target: bool = False,
    pool_name: str | None = None,
    label: str = "--features",
    choose: str | None = None,
) -> FeatureSet:
    """The one feature set that a feature-folder argument (``--features``, ``--target-features``,
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
        return FeatureSet.load(folder)
    sets = _store_sets(folder)
    if not sets:
        raise MissingFeatureError(f"{label} folder {folder} holds no feature set (no values.npy in it or in a "
                                  "subfolder); write one with `curate embed` / `curate gradients`.")
    for name in names:
        if name in sets:
            return FeatureSet.load(sets[name])
    pool_side = [n for n in sets if not n.endswith("/targets")]
    if not target and len(pool_side) == 1:
        return FeatureSet.load(sets[pool_side[0]])
    if target:
        tries = [next(iter(sets))] if len(sets) == 1 else []
        tries += [f"{pool_name}/targets"] if pool_name else []
        tries += [f"{pool_side[0]}/targets"] if len(pool_side) == 1 else []
        for name in tries:
            if name in sets:
                return FeatureSet.load(sets[name])
    side = "target" if target else "pool"
    side_sets = [n for n in sets if n.endswith("/targets")] if target else pool_side
    example = sets[(side_sets or list(sets))[0]]
    msg = f"{label} {folder} is a feature store with {len(sets)} feature set(s) {list(sets)}"
    msg += f", none of them {' or '.join(map(repr, names))}" if names else ""
    msg += (f", so it does not say which {side} set to use. Point {label} at one set's folder, "
            f"e.g. {label} {example}") + (f", or choose one with {choose}." if choose else ".")
    raise MissingFeatureError(msg)


def _load_features(folder: str | os.PathLike[str], roles: Sequence[str], defaults: Mapping[str, str],
                   label: str, pool_names: Mapping[str, str] | None = None) -> dict[str, FeatureSet]:
    """Fill every role in ``roles`` from ``folder`` (:func:`resolve_feature_set`): a feature-set
    folder fills them all; in a store each role takes its default feature name (``defaults``), the
    role name, or the store's one candidate set. ``pool_names`` (pool role -> the set name it got)
    lets ``target_<role>`` find ``<name>/targets``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFeatureError(f"{label} folder {folder} does not exist.")
    out: dict[str, FeatureSet] = {}
    for role in roles:
        target = role.startswith("target_")
        names = [n for n in (defaults.get(role), role) if n]
        pool_name = (pool_names or {}).get(role[len("target_"):]) if target else None
        out[role] = resolve_feature_set(folder, names=names, target=target, pool_name=pool_name, label=label)
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
    tokenizer: str | None = None,
) -> tuple[Selection, dict[str, Any]]:
    """Run selector ``name`` on a canonical parquet table and write the outputs to ``out_dir``.

    ``tokenizer`` (a tokenizer folder, a cached Hub id or ``default``) counts every row's tokens
    first (:func:`curate.curation.tokens.count_table`) into ``n_tokens`` / ``n_prompt_tokens`` /
    ``n_response_tokens``, which token budgets then spend; the manifest's ``tokens`` block names
    the tokenizer (or the column the counts came from, or ``approximate`` for the word estimate)
    and the curated token count. Nothing is written when the budget's quotas cannot be met.

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
    tok_name = None
    if tokenizer is not None:
        from curate.curation.tokens import COUNT_COLUMNS, count_table

        counts, info = count_table(table, None if tokenizer == "default" else tokenizer)
        tok_name = info["tokenizer"]
        table = table.drop([c for c in (*COUNT_COLUMNS, "n_rejected_tokens") if c in table.columns]).join(
            counts, on="uid", how="left", maintain_order="left")
    roles = sel.required_features()
    pool_roles = [r for r in roles if not r.startswith("target_") and r != "scores"]
    target_roles = [r for r in roles if r.startswith("target_")]
    feats: dict[str, FeatureSet] = {}
    if features is not None:
        feats.update(_load_features(features, pool_roles, cls.default_features, "--features"))
    if target_features is not None:
        feats.update(_load_features(target_features, target_roles, cls.default_features, "--target-features",
                                    pool_names={r: fs.name for r, fs in feats.items()}))
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
    used = {r: fs.name for r, fs in feats.items()}
    for label, p in (("features", features), ("target_features", target_features), ("scores", scores)):
        if p is not None:
            inputs[label] = {"path": str(p)}
    for label, rs in (("features", pool_roles), ("target_features", target_roles), ("scores", ["scores"])):
        if label in inputs and any(r in used for r in rs):
            inputs[label]["sets"] = {r: used[r] for r in rs if r in used}
    tokens = dict(res.diagnostics.get("tokens") or {})
    if tokens:
        tokens["tokenizer"] = tok_name or (None if tokens["approximate"] else f"counted ({tokens['counted_by']})")
    manifest = {
        "command": "select", "selector": name, "params": res.params, "budget": bud.describe(), "seed": seed,
        "inputs": inputs, "n_rows": table.height, "n_kept": res.n_kept, "diagnostics": res.diagnostics,
        **({"tokens": tokens} if tokens else {}),
        "outputs": ["curated.parquet", "rejected.parquet", "selection.parquet", "manifest.json"],
    }
    write_json(manifest, out / "manifest.json")
    return res, manifest
