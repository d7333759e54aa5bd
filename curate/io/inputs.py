"""Recipe inputs: what one entry of ``inputs:`` / ``targets:`` names, how it is described in the
manifest (and the ingest cache key), and how it is read.

An entry is a path string, in-memory data (``curate.parse_recipe({"inputs": [df], ...})``) or a
mapping::

    {path: data/*.jsonl, format: auto, kind: sft, sample: 500, map: {prompt: question}}
    {path: s3://bucket/pool/, ...}                    # any fsspec URI
    {path: saved_dataset_dir, split: train}           # Dataset(Dict).save_to_disk folder
    {hub: ORG/NAME, split: train, revision: v1.0, config: default, sample: 1000}
    {data: <DataFrame | Dataset | list of dicts>}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from curate.errors import RecipeError
from curate.io.readers import REJECT_SCHEMA, ReadResult, expand_inputs
from curate.io.sources import (
    check_input_keys,
    data_hash,
    describe_data,
    fetch,
    is_in_memory,
    is_saved_dataset,
    is_uri,
    parse_map,
    read_sources,
)
from curate.io.tables import read_table
from curate.io.writers import sha256_file
from curate.schema import SCHEMA, validate_table


@dataclass
class InputSpec:
    """One input of a recipe. ``sample``: keep a seeded random ``sample`` rows of this input
    (row-order invariant; e.g. a few targets per task for gradient-based selection on CPU).
    ``hub`` names a Hub dataset (with ``split``, ``revision``, ``config``); ``data`` holds in-memory
    rows; ``map`` renames source fields (:func:`curate.io.sources.apply_map`)."""

    path: str | None = None
    format: str = "auto"
    kind: str | None = None
    sample: int | None = None
    hub: str | None = None
    split: str | None = None
    revision: str | None = None
    config: str | None = None
    map: dict[str, str] | None = None
    data: Any = None
    _data_sha256: str | None = None

    def data_sha256(self) -> str:
        if self._data_sha256 is None:
            self._data_sha256 = data_hash(self.data)
        return self._data_sha256

    def resolved(self) -> dict[str, Any]:
        """Plain data for ``recipe.resolved.yaml``: the four base keys, then only the extras set
        (a plain path input resolves exactly as before, so its recipe hash does not change)."""
        out: dict[str, Any] = {"path": self.path, "format": self.format, "kind": self.kind, "sample": self.sample}
        for key in ("hub", "split", "revision", "config", "map"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.data is not None:
            out["path"] = describe_data(self.data)
            out["data_sha256"] = self.data_sha256()
        return out


def parse_inputs(value: Any, key: str, base: Path) -> list[InputSpec]:
    """The ``inputs:`` / ``targets:`` of a recipe as specs; relative paths against ``base``."""
    if value is None:
        return []
    if isinstance(value, (str, dict)) or is_in_memory(value) and not isinstance(value, list):
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(f"'{key}' must be a list of paths or {{path, format, kind}} mappings. Got {value!r}.")
    return [_one(item, f"{key}[{i}]", base) for i, item in enumerate(value)]


def _one(item: Any, where: str, base: Path) -> InputSpec:
    if isinstance(item, (str, os.PathLike)):
        item = {"path": str(item)}
    elif not isinstance(item, Mapping):
        item = {"data": item}
    check_input_keys(item, where)
    named = [k for k in ("path", "hub", "data") if item.get(k) is not None]
    if len(named) != 1:
        raise RecipeError(f"{where} must be a path or a mapping with exactly one of 'path', 'hub', 'data'. "
                          f"Got {item!r}.")
    sample = item.get("sample")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
        raise RecipeError(f"{where}: 'sample' must be an integer >= 1. Got {sample!r}.")
    for k in ("split", "revision", "config"):
        if item.get(k) is not None and not isinstance(item[k], str):
            raise RecipeError(f"{where}: '{k}' must be a string. Got {item[k]!r}.")
    hub = item.get("hub")
    if hub is not None and (not isinstance(hub, str) or hub.count("/") != 1):
        raise RecipeError(f"{where}: 'hub' must be ORG/NAME. Got {hub!r}.")
    if hub is not None and not item.get("split"):
        raise RecipeError(f"{where}: a hub input needs 'split' (e.g. split: train).")
    try:
        mapping = parse_map(item.get("map"), f"{where}.map")
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    path = item.get("path")
    if path is not None:
        path = str(path)
        if not is_uri(path):
            path = os.path.expanduser(path)
            if not os.path.isabs(path):
                path = os.path.normpath(str(base / path))
    spec = InputSpec(path=path, format=str(item.get("format", "auto")), kind=item.get("kind"), sample=sample,
                     hub=hub, split=item.get("split"), revision=item.get("revision"), config=item.get("config"),
                     map=mapping, data=item.get("data"))
    if spec.data is not None and not is_in_memory(spec.data):
        raise RecipeError(f"{where}: 'data' must be in-memory rows (a Dataset, DataFrame or list of dicts); "
                          "use 'path' for files.")
    return spec


def describe_input(spec: InputSpec) -> list[dict[str, Any]]:
    """Manifest entries of one input (each has ``path, size, sha256, format, kind, sample``; the
    ingest cache key hashes them). Only a ``hub:`` input or a URI touches the network."""
    common: dict[str, Any] = {"format": spec.format, "kind": spec.kind, "sample": spec.sample}
    if spec.map:
        common["map"] = spec.map
    if spec.data is not None:
        return [{"path": describe_data(spec.data), "size": None, "sha256": spec.data_sha256(), **common}]
    if spec.hub is not None:
        from curate.io import hub

        info = hub.resolve(spec.hub, spec.revision)
        return [{"path": f"hub:{spec.hub}", "size": sum(f.get("size") or 0 for f in info["files"]),
                 **info, "split": spec.split, "config": spec.config, **common}]
    assert spec.path is not None
    if is_uri(spec.path):
        return [{"path": url, "size": local.stat().st_size, "sha256": sha256_file(local), **common}
                for url, local in fetch(spec.path)]
    if is_saved_dataset(spec.path):
        files = sorted(p for p in Path(spec.path).rglob("*") if p.is_file())
        return [{"path": str(f), "size": f.stat().st_size, "sha256": sha256_file(f), "split": spec.split, **common}
                for f in files]
    return [{"path": str(f), "size": f.stat().st_size, "sha256": sha256_file(f), **common}
            for f in expand_inputs([spec.path])]


def describe_inputs(specs: list[InputSpec]) -> list[dict[str, Any]]:
    """:func:`describe_input` of every spec, in order."""
    return [entry for spec in specs for entry in describe_input(spec)]


def canonical_input(spec: InputSpec) -> pl.DataFrame | None:
    """The input as it is when it already is a canonical table (every column of
    :data:`curate.schema.SCHEMA`: a run's ``curated.parquet``, a verb's output, a DataFrame from
    ``curate.select``), else None.

    Such a table keeps its uids and the ``<step>__*`` columns of the steps that made it, so a chain
    of verbs gives the same table as one recipe with the same steps. A field map or an explicit
    format means the user wants it read as a source file instead.
    """
    if spec.map or spec.format != "auto":
        return None
    if isinstance(spec.data, pl.DataFrame):
        table, label = spec.data, describe_data(spec.data)
    elif spec.data is None and spec.hub is None and spec.path is not None and not is_uri(spec.path) \
            and spec.path.endswith(".parquet") and Path(spec.path).is_file():
        if not set(SCHEMA) <= set(pl.read_parquet_schema(spec.path)):
            return None
        table, label = read_table(spec.path), spec.path
    else:
        return None
    if not set(SCHEMA) <= set(table.columns):
        return None
    return validate_table(table, name=label)


def read_input(spec: InputSpec, *, on_error: str = "fail", progress: bool = False) -> ReadResult:
    """Read one recipe input (before its ``sample``); a canonical table is taken as it is
    (:func:`canonical_input`)."""
    table = canonical_input(spec)
    if table is not None:
        label = spec.path or describe_data(spec.data)
        return ReadResult(table, pl.DataFrame(schema=REJECT_SCHEMA), {label: "canonical"}, [label])
    kw: dict[str, Any] = {"format": spec.format, "kind": spec.kind, "on_error": on_error, "progress": progress,
                          "map": spec.map}
    if spec.data is not None:
        return read_sources([spec.data], **kw)
    if spec.hub is not None:
        from curate.io import hub

        assert spec.split is not None
        ds = hub.load(spec.hub, split=spec.split, revision=spec.revision, config=spec.config)
        res = read_sources([ds], **kw)
        label = f"hub:{spec.hub}/{spec.split}"  # rows name the repo, not the in-memory Dataset
        res.table = res.table.with_columns(pl.lit(label).alias("source"))
        res.rejects = res.rejects.with_columns(pl.lit(label).alias("source"))
        res.formats = dict.fromkeys([label], next(iter(res.formats.values()), "auto"))
        res.files = [label]
        return res
    return read_sources([spec.path], split=spec.split, **kw)


def count_files(spec: InputSpec) -> int:
    """How many files a local input names (0 for in-memory, Hub and remote inputs: nothing is fetched)."""
    if spec.path is None or is_uri(spec.path) or is_saved_dataset(spec.path):
        return 0
    return len(expand_inputs([spec.path]))
