"""User steps in recipes: ``plugins:`` (files and modules), ``use: module:Class`` and ``@row_filter``.

A recipe's ``plugins: [./my_steps.py, mypkg.steps]`` are imported before its steps are built, so
the steps they register (``@curate.register_step`` on a frozen dataclass with ``apply``, or
``@curate.row_filter``) are usable by name. :func:`row_filter` turns a per-row predicate into a step::

    @curate.row_filter("no_urls", field="response")
    def no_urls(text: str, max_urls: int = 0) -> bool | str:
        n = text.count("http")
        return True if n <= max_urls else f"{n} URLs"

Extra keyword arguments of the predicate become the step's parameters (``use: no_urls,
max_urls: 1``). The predicate returns True/None (keep), False (drop: reason ``<name>``), a string
(drop: reason ``<name>: <string>``) or ``(keep, reason)``. Rows are filtered in shards through
the run's executor, so the step runs on Ray like the built-in filters; a predicate from a plugin
file is shipped to the Ray workers by value (they cannot import the file).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from curate.errors import RecipeError
from curate.io.plugins import code_key, import_module
from curate.pipeline.registry import STEPS, register_step
from curate.schema import TEXT_FIELDS, texts


def forget_module(module: str) -> None:
    """Drop the steps a plugin module registered (before its changed file is imported again)."""
    for name in [n for n, cls in STEPS.items() if getattr(cls, "__module__", None) == module]:
        del STEPS[name]


def load_plugins(specs: Any, base: Path | None = None, *, where: str = "recipe") -> list[dict[str, Any]]:
    """Import the plugin files / modules ``specs`` (relative files against ``base``).

    Returns:
        The record of each (``plugin, module, version, file, sha256``), in order.

    Raises:
        RecipeError: ``specs`` is not a list of strings, or a plugin fails to import (named).
    """
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, list) or not all(isinstance(s, str) and s for s in specs):
        raise RecipeError(f"{where}: 'plugins' must be a list of Python files or module names. Got {specs!r}.")
    return [import_module(s, base, forget=forget_module)[1] for s in specs]


def _values(table: pl.DataFrame, field: str | None) -> list[Any]:
    if field is None:
        return table.to_dicts()
    if field in table.columns:
        return table[field].to_list()
    return texts(table, field)


def _verdict(name: str, out: Any) -> tuple[bool, str]:
    if isinstance(out, tuple) and len(out) == 2:
        keep, why = bool(out[0]), str(out[1] or "")
        return keep, "" if keep else f"{name}: {why}" if why else name
    if out is None or out is True or out == "":
        return True, ""
    if out is False:
        return False, name
    if isinstance(out, str):
        return False, f"{name}: {out}"
    raise TypeError(f"row filter '{name}' returned {type(out).__name__} {out!r}; return a bool, a reason string, "
                    "None or (keep, reason).")


def _filter_shard(predicate: Callable[..., Any], name: str, params: dict[str, Any],
                  values: list[Any]) -> list[tuple[bool, str]]:
    """One shard's verdicts (a module-level function, so executors can ship it)."""
    return [_verdict(name, predicate(v, **params)) for v in values]


def _apply(self: Any, table: pl.DataFrame, ctx: Any) -> pl.DataFrame:
    params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    fn = functools.partial(_filter_shard, type(self).predicate, type(self).name, params)
    shards = ctx.map_shards(fn, table, params={"row_filter": type(self).name, **params, "code": code_key(self)},
                            payload=lambda s: _values(s, type(self).row_field), shard_size=type(self).shard_size,
                            desc=type(self).name)
    verdicts = [v for shard in shards for v in shard]
    return pl.DataFrame({"uid": table["uid"], "keep": [k for k, _ in verdicts], "reason": [r for _, r in verdicts]},
                        schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8})


def row_filter(name: str, field: str | None = "prompt+response", *,
               shard_size: int = 1000) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register predicate ``fn(value, **params)`` as the keep/reason step ``name``.

    Args:
        name: the step name (``use: name`` in a recipe).
        field: what the predicate gets per row: a text field of :func:`curate.schema.texts`
            (``prompt``, ``response``, ``prompt+response``, ``chosen``, ``rejected``,
            ``conversation``), a column name, or None for the whole row as a dict.
        shard_size: rows per shard on the executor.

    The decorated function is returned unchanged, with the step class as ``fn.step``.
    """
    if field is not None and not isinstance(field, str):
        raise TypeError(f"row_filter '{name}': field must be a text field, a column name or None. Got {field!r}.")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = list(inspect.signature(fn).parameters.values())[1:]
        fields: list[Any] = []
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"row_filter '{name}': *args/**kwargs cannot be step parameters.")
            fields.append((p.name, Any) if p.default is p.empty else (p.name, Any, dataclasses.field(default=p.default)))
        doc = (fn.__doc__ or "").strip() or f"Row filter {name} ({fn.__name__} on {field or 'the row'})."
        cls = dataclasses.make_dataclass(
            f"RowFilter_{fn.__name__}", fields, frozen=True, kw_only=True,
            namespace={"apply": _apply, "__doc__": doc, "predicate": staticmethod(fn), "row_field": field,
                       "shard_size": shard_size},
        )
        cls.__module__ = fn.__module__  # the plugin's module: its file hash keys the step's cache
        register_step(name)(cls)
        fn.step = cls  # type: ignore[attr-defined]
        return fn

    return deco


__all__ = ["TEXT_FIELDS", "forget_module", "load_plugins", "row_filter"]
