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

Relative paths are resolved against the recipe file's folder: ``inputs``, ``targets``, ``output``
and the step parameters that name files or folders. A step class declares those with two class
attributes (:func:`path_markers`): ``path_params``, parameters that are always paths (a criteria
file, human pairs, fitted factors, an export target) and ``path_or_name_params``, parameters that
are a local path *or* a name (a model or tokenizer folder or a Hub id, ``from_step`` checkpoints):
these resolve only when they start with ``./`` or ``../`` or name something that exists under the
recipe's folder. Other parameters (feature names such as ``embed/prompt+response``, options) are
never touched. Absolute paths, ``~`` paths and URIs stay as written; a value given with ``--set``
resolves against the current working directory, where the user typed it. The resolved recipe
(``recipe.resolved.yaml``, the recipe hash) holds the absolute paths, so the same recipe run from
any folder reads the same files. Unknown keys raise a
:class:`~curate.errors.RecipeError` that lists the valid ones. Every name that becomes a path (the
recipe ``name``, feature names and step outputs inside the run folder) is checked with
:func:`curate.io.paths.check_name`; YAML aliases may expand to at most :data:`MAX_YAML_NODES` nodes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curate.errors import ParameterError, RecipeError
from curate.io.inputs import InputSpec, parse_inputs
from curate.io.paths import check_name
from curate.io.sources import INPUT_KEYS  # noqa: F401 - re-exported: the keys an input mapping takes
from curate.io.store import external_set_folder
from curate.pipeline.plugins import load_plugins
from curate.pipeline.registry import build_step, load_steps
from curate.pipeline.step import step_params

TOP_KEYS = ("name", "seed", "inputs", "targets", "output", "executor", "device", "on_error", "steps", "description",
            "plugins")
EXECUTORS = ("local", "ray")

# Step parameters that name a feature set or a folder inside the run folder (not a file path):
# use -> {param: nested}, where nested allows "/" between parts (feature names like grad/adam).
# Selector steps' ``features`` mapping values are feature names too (checked for every step).
NAME_PARAMS: dict[str, dict[str, bool]] = {
    "whiten": {"pool": True, "target": True, "output": True},
    "grad_features": {"feature_name": True, "target_name": True},
    "influence_scores": {"feature": True},
    "semantic_dedup": {"feature": True},
    "warmup": {"save_as": False},
}

# A recipe is a few hundred YAML nodes; aliases that expand past this are refused before anything
# walks the expanded tree (a 600-byte "billion laughs" recipe expands to ~10^9 nodes).
MAX_YAML_NODES = 100_000


def _expanded_size(root: yaml.Node, where: str) -> int:
    """Number of nodes of ``root`` with every alias expanded, computed on the shared node graph
    (memoised per node, so a bomb is measured in time linear in its text); refuses cycles."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            active.discard(nid)
            kids = _children(node)
            sizes[nid] = min(1 + sum(sizes[id(k)] for k in kids), MAX_YAML_NODES + 1)
            continue
        if nid in sizes:
            continue
        if nid in active:
            raise RecipeError(f"{where}: a YAML alias refers to a node that contains it (a recursive anchor).")
        active.add(nid)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [x for kv in node.value for x in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def safe_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, refusing documents whose aliases expand past :data:`MAX_YAML_NODES`
    nodes (RecipeError). Only safe tags are constructed (no ``!!python/object``)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, where) > MAX_YAML_NODES:
            raise RecipeError(f"{where}: YAML aliases expand to more than {MAX_YAML_NODES} values (an alias bomb?). "
                              "Write the repeated values out, or use fewer '*alias' references.")
        return loader.construct_document(node)
    finally:
        loader.dispose()


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
    plugins: list[dict[str, Any]] = field(default_factory=list)  # module, version, file sha256 of user code

    def resolved(self) -> dict[str, Any]:
        """Plain data of the recipe with every default filled in (``recipe.resolved.yaml``)."""
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "inputs": [i.resolved() for i in self.inputs],
            "targets": [i.resolved() for i in self.targets],
            "output": self.output,
            "executor": self.executor,
            "device": self.device,
            "on_error": self.on_error,
            "steps": [{"name": s.name, "use": s.use, **step_params(s.step)} for s in self.steps],
            **({"plugins": self.plugins} if self.plugins else {}),  # absent without plugins: hashes unchanged
        }

    def hash(self) -> str:
        """Hash of the resolved recipe (what the run depends on; not the output folder)."""
        data = self.resolved()
        data.pop("output")
        data.pop("description")
        return hashlib.blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _parse_value(text: str) -> Any:
    try:
        return safe_yaml(text, f"--set value {text[:40]!r}")
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides. Keys are dotted: ``seed``, ``steps.<step name>.<param>``,
    ``steps.<index>.<param>``; values are parsed as YAML (``0.1``, ``true``, ``[a, b]``)."""
    return _apply_overrides(raw, overrides)[0]


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], set[tuple[int, str]]]:
    """:func:`apply_overrides`, also returning the (step index, parameter) pairs it set (their
    relative paths resolve against the working directory, not the recipe's folder)."""
    raw = copy.deepcopy(raw)
    touched: set[tuple[int, str]] = set()
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
                touched.add((i, parts[2]))
                break
        if target is None:
            names = [s.get("name", s.get("use")) for s in steps if isinstance(s, dict)]
            raise RecipeError(f"--set '{item}': no step named '{parts[1]}'. Steps: {names}.")
        target[parts[2]] = val
    return raw, touched


def path_markers(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The parameters of step class ``cls`` that are paths: (``path_params``, ``path_or_name_params``).

    Both are class attributes (``ClassVar[tuple[str, ...]]``) a step sets when it reads or writes
    files outside the run folder; a step without them has no path parameters.
    """
    return tuple(getattr(cls, "path_params", ())), tuple(getattr(cls, "path_or_name_params", ()))


def _step_class(use: str) -> type | None:
    cls = load_steps().get(use)
    if cls is None and ":" in use:  # use: pkg.module:StepClass (build_step reports a bad one)
        from curate.io.plugins import import_object

        try:
            cls = import_object(use)
        except Exception:  # noqa: BLE001 - build_step raises the user-facing error for it
            return None
    return cls if isinstance(cls, type) else None


def _is_local(value: str) -> bool:
    """A relative filesystem path (not absolute, not ``~``, not a URI or ``hub:`` name)."""
    return bool(value) and not (os.path.isabs(value) or value.startswith(("~", "hub:")) or "://" in value)


def _resolve_one(value: Any, base: Path, always: bool) -> Any:
    if isinstance(value, (list, tuple)):
        return [_resolve_one(v, base, always) for v in value]
    if not isinstance(value, str) or not _is_local(value):
        return value
    joined = base / value
    if always or value.startswith(("./", "../")) or value in (".", "..") or joined.exists():
        return os.path.normpath(str(joined))
    return value  # a model name or Hub id that only looks like a relative path


def resolve_step_paths(use: str, params: dict[str, Any], base: Path, *, cwd_params: Collection[str] = ()) -> dict[str, Any]:
    """``params`` with the relative paths of step ``use``'s path parameters (:func:`path_markers`)
    made absolute against ``base`` (``cwd_params``: against the working directory instead)."""
    cls = _step_class(use)
    if cls is None:
        return params
    paths, names = path_markers(cls)
    out = dict(params)
    for key, always in [*((k, True) for k in paths), *((k, False) for k in names)]:
        if key in out:
            out[key] = _resolve_one(out[key], Path.cwd() if key in cwd_params else base, always)
    return out


def _inputs(value: Any, key: str, base: Path) -> list[InputSpec]:
    # paths, URIs, save_to_disk folders, hub: datasets and in-memory data (curate.io.inputs)
    return parse_inputs(value, key, base)


def parse_recipe(raw: Any, *, base: Path | None = None, source: str | None = None,
                 cwd_params: Collection[tuple[int, str]] = ()) -> Recipe:
    """Validate a recipe mapping and build its steps (so bad parameters fail at load time).

    With ``base`` (the recipe file's folder), relative paths in step path parameters become
    absolute against it, except the (step index, parameter) pairs in ``cwd_params`` (set by
    ``--set``), which resolve against the working directory. Without ``base`` (a recipe built in
    Python) step parameters stay as written and paths are relative to the working directory.
    """
    file_base = base
    where = source or "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping. Got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}. Valid keys: {', '.join(TOP_KEYS)}.")
    if not raw.get("name") or not isinstance(raw["name"], str):
        raise RecipeError(f"{where}: 'name' (a non-empty string) is required.")
    try:  # the name is a folder under `output`: it must not climb out of it or be absolute
        check_name(f"recipe {where}", "name", raw["name"])
    except ParameterError as exc:
        raise RecipeError(str(exc)) from None
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
    plugins = load_plugins(raw.get("plugins"), base, where=where)
    steps_raw = raw.get("steps") or []
    if not isinstance(steps_raw, list):
        raise RecipeError(f"{where}: 'steps' must be a list of {{use: <step>, ...params}}.")
    steps: list[StepSpec] = []
    names: set[str] = set()
    for i, s in enumerate(steps_raw):
        if not isinstance(s, dict) or "use" not in s:
            raise RecipeError(f"{where}: steps[{i}] must be a mapping with 'use'. Got {s!r}.")
        params = {k: v for k, v in s.items() if k not in ("use", "name")}
        if file_base is not None:
            params = resolve_step_paths(str(s["use"]), params, file_base,
                                        cwd_params={p for j, p in cwd_params if j == i})
        name = str(s.get("name", str(s["use"]).rpartition(":")[2]))  # use: pkg.mod:Class -> name Class
        if name in names:
            raise RecipeError(f"{where}: step name '{name}' is used twice; give one a different 'name:'.")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise RecipeError(f"{where}: step name '{name}' may contain only letters, digits, '_' and '-'.")
        names.add(name)
        step = build_step(str(s["use"]), params, where=f"{where}: steps[{i}] ({name})")
        _check_step_names(str(s["use"]), step, f"{where}: steps[{i}] ({name})")
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
        plugins=_plugin_list(plugins, steps),
    )


def _plugin_list(declared: list[dict[str, Any]], steps: list[StepSpec]) -> list[dict[str, Any]]:
    """The recipe's plugins, then those that brought a used step (entry points, module:Class)."""
    from curate.io.plugins import plugin_records

    seen = {p["module"] for p in declared}
    used = [p for p in plugin_records([type(s.step).__module__ for s in steps]) if p["module"] not in seen]
    return [*declared, *used]


def _check_step_names(use: str, step: Any, where: str) -> None:
    """Refuse step parameters that become paths in the run folder and would leave it (``..``, ``/x``)."""
    params = step_params(step)
    checks = [(k, params.get(k), nested) for k, nested in NAME_PARAMS.get(use, {}).items()]
    feats = params.get("features")
    if isinstance(feats, dict):
        checks += [(f"features.{role}", v, True) for role, v in feats.items() if not external_set_folder(v)]
    for param, value, nested in checks:
        if value is None or (param == "feature_name" and value == ""):
            continue
        try:
            check_name(f"step '{use}'", param, value, nested=nested)
        except ParameterError as exc:
            raise RecipeError(f"{where}: {exc}") from None


def load_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None,
                plugins: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (safe tags only, bounded aliases), apply ``--set`` overrides and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    try:
        raw = safe_yaml(text, str(path))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    touched: set[tuple[int, str]] = set()
    if overrides:
        raw, touched = _apply_overrides(raw if isinstance(raw, dict) else {}, overrides)
    if plugins and isinstance(raw, dict):  # --plugin: files relative to the working directory
        raw["plugins"] = [*(raw.get("plugins") or []),
                          *(str(Path(p).resolve()) if p.endswith(".py") else p for p in plugins)]
    return parse_recipe(raw, base=path.resolve().parent, source=str(path), cwd_params=touched)
