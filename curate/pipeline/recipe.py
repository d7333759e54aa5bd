"""YAML recipes: loading, validation, ``--set`` overrides and the resolved form.

A recipe::

    name: demo                 # required; run folders go to <output>/<name>/<run_id>
    seed: 0
    inputs:                    # the pool: paths (files, folders, globs) or {path, format, kind, sample}
      - ../../shared/data/alpaca/alpaca_5000.json
    targets: []                # optional target/evaluation sets (kind target), same forms
    output: ../runs            # base folder of run folders
    executor: local            # local | ray
    device: auto
    on_error: fail             # fail | skip (ingest of malformed lines)
    steps:
      - use: exact_dedup       # a registered step; `name:` defaults to `use`
        level: prompt

Relative paths are resolved against the recipe file's folder. Unknown keys raise a
:class:`~curate.errors.RecipeError` that lists the valid ones.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curate.errors import RecipeError
from curate.pipeline.registry import build_step
from curate.pipeline.step import step_params

TOP_KEYS = ("name", "seed", "inputs", "targets", "output", "executor", "device", "on_error", "steps", "description")
INPUT_KEYS = ("path", "format", "kind", "sample")
EXECUTORS = ("local", "ray")


@dataclass
class InputSpec:
    """One input of a recipe. ``sample``: keep a seeded random ``sample`` rows of this input
    (row-order invariant; e.g. a few targets per task for gradient-based selection on CPU)."""

    path: str
    format: str = "auto"
    kind: str | None = None
    sample: int | None = None


@dataclass
class StepSpec:
    name: str
    use: str
    params: dict[str, Any]
    step: Any  # the built step object


@dataclass
class Recipe:
    name: str
    seed: int
    inputs: list[InputSpec]
    targets: list[InputSpec]
    output: str
    executor: str
    device: str
    on_error: str
    steps: list[StepSpec]
    description: str = ""
    source: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> dict[str, Any]:
        """Plain data of the recipe with every default filled in (``recipe.resolved.yaml``)."""
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "inputs": [vars(i).copy() for i in self.inputs],
            "targets": [vars(i).copy() for i in self.targets],
            "output": self.output,
            "executor": self.executor,
            "device": self.device,
            "on_error": self.on_error,
            "steps": [{"name": s.name, "use": s.use, **step_params(s.step)} for s in self.steps],
        }

    def hash(self) -> str:
        """Hash of the resolved recipe (what the run depends on; not the output folder)."""
        data = self.resolved()
        data.pop("output")
        data.pop("description")
        return hashlib.blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides. Keys are dotted: ``seed``, ``steps.<step name>.<param>``,
    ``steps.<index>.<param>``; values are parsed as YAML (``0.1``, ``true``, ``[a, b]``)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set '{item}': expected KEY=VALUE, e.g. steps.select.budget=0.1.")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        val = _parse_value(value)
        if parts[0] != "steps":
            if len(parts) != 1:
                raise RecipeError(f"--set '{item}': only steps.<name>.<param> keys may be nested.")
            if parts[0] not in TOP_KEYS:
                raise RecipeError(f"--set '{item}': unknown key '{parts[0]}'. Valid keys: {', '.join(TOP_KEYS)}.")
            raw[parts[0]] = val
            continue
        if len(parts) != 3:
            raise RecipeError(f"--set '{item}': step overrides look like steps.<step name>.<param>=VALUE.")
        steps = raw.get("steps") or []
        target = None
        for i, s in enumerate(steps):
            if isinstance(s, dict) and (s.get("name", s.get("use")) == parts[1] or str(i) == parts[1]):
                target = s
                break
        if target is None:
            names = [s.get("name", s.get("use")) for s in steps if isinstance(s, dict)]
            raise RecipeError(f"--set '{item}': no step named '{parts[1]}'. Steps: {names}.")
        target[parts[2]] = val
    return raw


def _inputs(value: Any, key: str, base: Path) -> list[InputSpec]:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(f"'{key}' must be a list of paths or {{path, format, kind}} mappings. Got {value!r}.")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or "path" not in item:
            raise RecipeError(f"{key}[{i}] must be a path or a mapping with 'path'. Got {item!r}.")
        unknown = sorted(set(item) - set(INPUT_KEYS))
        if unknown:
            raise RecipeError(f"{key}[{i}]: unknown key(s) {unknown}. Valid keys: {list(INPUT_KEYS)}.")
        path = os.path.expanduser(str(item["path"]))
        if not os.path.isabs(path):
            path = os.path.normpath(str(base / path))
        sample = item.get("sample")
        if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
            raise RecipeError(f"{key}[{i}]: 'sample' must be an integer >= 1. Got {sample!r}.")
        out.append(InputSpec(path=path, format=str(item.get("format", "auto")), kind=item.get("kind"), sample=sample))
    return out


def parse_recipe(raw: Any, *, base: Path | None = None, source: str | None = None) -> Recipe:
    """Validate a recipe mapping and build its steps (so bad parameters fail at load time)."""
    where = source or "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping. Got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}. Valid keys: {', '.join(TOP_KEYS)}.")
    if not raw.get("name") or not isinstance(raw["name"], str):
        raise RecipeError(f"{where}: 'name' (a non-empty string) is required.")
    base = base or Path.cwd()
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise RecipeError(f"{where}: 'seed' must be an integer >= 0. Got {seed!r}.")
    executor = raw.get("executor", "local")
    if executor not in EXECUTORS:
        raise RecipeError(f"{where}: 'executor' must be one of {EXECUTORS}. Got {executor!r}.")
    on_error = raw.get("on_error", "fail")
    if on_error not in ("fail", "skip"):
        raise RecipeError(f"{where}: 'on_error' must be 'fail' or 'skip'. Got {on_error!r}.")
    inputs = _inputs(raw.get("inputs"), "inputs", base)
    if not inputs:
        raise RecipeError(f"{where}: 'inputs' must name at least one file, folder or glob.")
    steps_raw = raw.get("steps") or []
    if not isinstance(steps_raw, list):
        raise RecipeError(f"{where}: 'steps' must be a list of {{use: <step>, ...params}}.")
    steps: list[StepSpec] = []
    names: set[str] = set()
    for i, s in enumerate(steps_raw):
        if not isinstance(s, dict) or "use" not in s:
            raise RecipeError(f"{where}: steps[{i}] must be a mapping with 'use'. Got {s!r}.")
        params = {k: v for k, v in s.items() if k not in ("use", "name")}
        name = str(s.get("name", s["use"]))
        if name in names:
            raise RecipeError(f"{where}: step name '{name}' is used twice; give one a different 'name:'.")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise RecipeError(f"{where}: step name '{name}' may contain only letters, digits, '_' and '-'.")
        names.add(name)
        step = build_step(str(s["use"]), params, where=f"{where}: steps[{i}] ({name})")
        steps.append(StepSpec(name=name, use=str(s["use"]), params=params, step=step))
    output = str(raw.get("output", "runs"))
    if not os.path.isabs(output):
        output = os.path.normpath(str(base / output))
    return Recipe(
        name=raw["name"],
        seed=seed,
        inputs=inputs,
        targets=_inputs(raw.get("targets"), "targets", base),
        output=output,
        executor=executor,
        device=str(raw.get("device", "auto")),
        on_error=on_error,
        steps=steps,
        description=str(raw.get("description", "")),
        source=source,
        raw=raw,
    )


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (``yaml.safe_load``), apply ``--set`` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        raw = apply_overrides(raw if isinstance(raw, dict) else {}, overrides)
    return parse_recipe(raw, base=path.resolve().parent, source=str(path))
