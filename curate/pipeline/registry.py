"""The step registry: one visible dict, filled by ``@register_step`` in the step modules.

Packages that define steps are listed in :data:`STEP_PACKAGES`; they are imported on first use
so heavy dependencies stay lazy (step modules import torch/faiss/... inside ``apply`` only).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from curate.errors import ParameterError, RecipeError
from curate.io.plugins import LOADED, entry_point_objects, import_object

STEPS: dict[str, type] = {}

# Packages whose import registers steps. Each package's __init__ imports its step modules.
STEP_PACKAGES = (
    "curate.pipeline.builtin",
    "curate.curation",
    "curate.features",
    "curate.selectors",
    "curate.preference",
    "curate.influence",
)

T = TypeVar("T", bound=type)


def register_step(name: str) -> Callable[[T], T]:
    """Class decorator: register a step dataclass under ``name`` (and set ``cls.name``)."""

    def deco(cls: T) -> T:
        if name in STEPS and STEPS[name] is not cls:
            raise RuntimeError(f"step name '{name}' registered twice ({STEPS[name]} and {cls}).")
        cls.name = name  # type: ignore[attr-defined]
        STEPS[name] = cls
        return cls

    return deco


_loaded = False


def load_steps() -> dict[str, type]:
    """Import every step package once and return :data:`STEPS`."""
    global _loaded
    if not _loaded:
        for pkg in STEP_PACKAGES:
            try:
                importlib.import_module(pkg)
            except ModuleNotFoundError as exc:  # a package not written yet
                if exc.name != pkg:
                    raise
        _loaded = True
        # installed plugins: a module whose import registers steps, or a step class
        for ep_name, obj in entry_point_objects("curate.steps"):
            if isinstance(obj, type) and obj not in STEPS.values():
                register_step(ep_name)(obj)
    return STEPS


def step_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def build_step(use: str, params: Mapping[str, Any], *, where: str = "step") -> Any:
    """Instantiate the step registered as ``use`` with ``params``.

    Raises:
        RecipeError: unknown step, unknown parameter (listing the valid ones) or a bad value.
    """
    steps = load_steps()
    if use not in steps and ":" in use:  # use: mypkg.module:StepClass
        cls = import_object(use)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and hasattr(cls, "apply")):
            raise RecipeError(f"{where}: '{use}' is not a step class (a dataclass with apply(table, ctx)).")
        if cls not in steps.values():
            register_step(use)(cls)
        use = next(n for n, c in steps.items() if c is cls)
    if use not in steps:
        raise RecipeError(f"{where}: unknown step '{use}'. Known steps: {', '.join(sorted(steps))}.")
    cls = steps[use]
    valid = step_fields(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise RecipeError(
            f"{where}: unknown parameter(s) {unknown} for step '{use}'. Valid parameters: {sorted(valid) or 'none'}."
        )
    try:
        return cls(**params)
    except (ParameterError, ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def describe_steps() -> dict[str, dict[str, Any]]:
    """name -> {doc, params: {name: default}} for ``curate list``."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in sorted(load_steps().items()):
        params = {}
        for f in step_fields(cls).values():
            if f.default is not dataclasses.MISSING:
                params[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                params[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                params[f.name] = "<required>"
        doc = (cls.__doc__ or "").strip().splitlines()
        out[name] = {"doc": doc[0] if doc else "", "params": params}
        plugin = LOADED.get(getattr(cls, "__module__", ""))
        if plugin is not None:
            out[name]["plugin"] = plugin["plugin"]
    return out
