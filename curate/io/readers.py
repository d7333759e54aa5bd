"""Read source files of any supported shape into the canonical table.

``read_sources`` expands inputs (files, folders, globs), opens each container, detects the format
from the first records (or uses the one named), converts every record with
:func:`curate.schema.make_record`, and makes uids unique once over all inputs. Malformed records
raise :class:`~curate.errors.SchemaError` naming file:line, field, expected and found; with
``on_error="skip"`` they go to ``rejects`` instead. Records that are well formed but give no row
(ties, transcripts without a shared prompt) always go to ``rejects`` with their reason.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from curate.errors import SchemaError, param_error
from curate.io.detect import RAW_LIMIT, Item, detect_items, is_data_file, load
from curate.io.formats import FORMATS, Ctx, Rejected
from curate.schema import KINDS, dedupe_uids, to_frame

REJECT_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.Utf8,
    "source_line": pl.Int64,
    "field": pl.Utf8,
    "reason": pl.Utf8,
    "raw": pl.Utf8,
}
ON_ERROR = ("fail", "skip")


@dataclass
class ReadResult:
    """What a read produced.

    Attributes:
        table: canonical rows (exactly :data:`curate.schema.SCHEMA`), uids unique.
        rejects: ``source, source_line, field, reason, raw`` of every record that gave no row.
        formats: file -> name of the format used.
        files: files read, in order.
    """

    table: pl.DataFrame
    rejects: pl.DataFrame
    formats: dict[str, str]
    files: list[str]


def expand_inputs(inputs: Sequence[str | Path] | str | Path) -> list[Path]:
    """Files named by ``inputs``, in order: a file as is; a folder -> every data file inside
    (recursively, sorted; LICENSE, README, ``*.md`` and ``*.txt`` skipped); a glob -> its sorted
    matches (folders among them expanded the same way).

    Raises:
        SchemaError: an input matches nothing.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[Path] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_file():
            out.append(p)
            continue
        if p.is_dir():
            found = _folder(p)
        elif glob.has_magic(str(inp)):
            found = []
            for m in _glob(str(inp)):
                mp = Path(m)
                found += _folder(mp) if mp.is_dir() else [mp] if mp.is_file() else []
            found = _once(found)
        else:
            raise SchemaError("input not found.", file=str(inp), expected="an existing file, folder or glob",
                              found="nothing at that path")
        if not found:
            raise SchemaError("input has no data files.", file=str(inp),
                              expected="at least one .json/.jsonl/.parquet/.csv file (optionally .gz)", found="none")
        out += found
    return out


def _walk(root: str) -> list[tuple[str, bool]]:
    """``(path relative to root, is a folder)`` of everything under ``root`` except hidden names,
    in sorted depth-first order. Symlinked folders are followed, but each real folder is entered
    once, so a link loop neither hangs nor repeats files (``glob``'s ``**`` does both)."""
    out: list[tuple[str, bool]] = []
    seen = {os.path.realpath(root or ".")}
    for top, dirs, files in os.walk(root or ".", followlinks=True):
        rel = os.path.relpath(top, root or ".")
        rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(top, d))
            if d.startswith(".") or real in seen:
                continue
            seen.add(real)
            keep.append(d)
            out.append((rel + d, True))
        dirs[:] = keep
        out += [(rel + f, False) for f in sorted(files) if not f.startswith(".")]
    return out


def _once(paths: list[Path]) -> list[Path]:
    """``paths`` without the repeats of a real file (two links to one file are read once)."""
    seen: set[str] = set()
    out = []
    for p in paths:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out


def _folder(folder: Path) -> list[Path]:
    files = [(rel, folder / rel) for rel, is_dir in _walk(str(folder)) if not is_dir]
    return _once([p for _, p in sorted(files) if p.is_file() and is_data_file(p)])


def _matches(pattern: list[str], parts: list[str]) -> bool:
    """Whether path components ``parts`` match glob components ``pattern`` (``**`` = any number of
    components, other components by :func:`fnmatch.fnmatchcase`)."""

    def close(states: set[int]) -> set[int]:  # "**" may also match no component
        out, stack = set(states), list(states)
        while stack:
            i = stack.pop()
            if i < len(pattern) and pattern[i] == "**" and i + 1 not in out:
                out.add(i + 1)
                stack.append(i + 1)
        return out

    states = close({0})
    for comp in parts:
        states = close({i if pattern[i] == "**" else i + 1 for i in states
                        if i < len(pattern) and (pattern[i] == "**" or fnmatch.fnmatchcase(comp, pattern[i]))})
        if not states:
            return False
    return len(pattern) in states


def _glob(pattern: str) -> list[str]:
    """Sorted matches of ``pattern``; ``**`` matches any number of folders, each real folder
    visited once (see :func:`_walk`)."""
    if "**" not in pattern:
        return sorted(glob.glob(pattern))  # no recursion, so no loop to fall into
    parts = pattern.split("/")
    k = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = "/" if parts[:k] == [""] else "/".join(parts[:k])
    rest = parts[k:]
    found = []
    for rel, _ in [("", True), *_walk(root)]:
        if _matches(rest, rel.split("/") if rel else []):
            found.append(os.path.join(root, rel) if root else rel)
    return sorted(found)


def _check_args(format: str, kind: str | None, on_error: str) -> None:
    if format != "auto" and format not in FORMATS:
        raise param_error("read_sources", "format", f"'auto' or one of {sorted(FORMATS)}", format)
    if kind is not None and kind not in KINDS:
        raise param_error("read_sources", "kind", f"None or one of {KINDS}", kind)
    if on_error not in ON_ERROR:
        raise param_error("read_sources", "on_error", f"one of {ON_ERROR}", on_error)


def _reject(rejects: list[dict[str, Any]], source: str, line: int | None, field: str | None, reason: str, raw: str) -> None:
    rejects.append({"source": source, "source_line": line, "field": field, "reason": reason, "raw": raw[:RAW_LIMIT]})


def _raw(item: Item) -> str:
    if item.raw:
        return item.raw
    try:
        return json.dumps(item.obj, ensure_ascii=False, default=str)[:RAW_LIMIT]
    except (TypeError, ValueError):
        return repr(item.obj)[:RAW_LIMIT]


def _read_file(path: Path, format: str, kind: str | None, on_error: str, records: list[dict[str, Any]],
               rejects: list[dict[str, Any]], progress: bool) -> str | None:
    src = str(path)
    try:
        loaded = load(path)
    except SchemaError as exc:
        if on_error == "fail":
            raise
        _reject(rejects, src, exc.line, exc.field, str(exc), "")
        return None
    if not loaded.items:
        err, raw = loaded.errors[0]
        if on_error == "fail":
            raise err
        for err, raw in loaded.errors:
            _reject(rejects, src, err.line, err.field, str(err), raw)
        return None
    try:
        name = format if format != "auto" else detect_items(path, loaded.items)
    except SchemaError as exc:
        if on_error == "fail":
            raise
        _reject(rejects, src, exc.line, exc.field, str(exc), _raw(loaded.items[0]))
        return None
    info = FORMATS[name]
    use_kind = kind or info.default_kind
    if use_kind not in info.kinds:
        raise SchemaError(f"format '{name}' cannot give rows of this kind.", file=src, field="kind",
                          expected=f"one of {info.kinds}", found=use_kind)
    ctx = Ctx(source=src, line=0, format=name, kind=use_kind, stem=_stem(path))
    # parse errors and records in line order, so on_error="fail" stops at the first bad line
    events: list[tuple[int, int, Any]] = [(e.line or 0, 0, (e, raw)) for e, raw in loaded.errors]
    events += [(it.line, 1, it) for it in loaded.items]
    events.sort(key=lambda ev: (ev[0], ev[1]))
    bar = None
    if progress:
        from curate._lazy import require

        bar = require("tqdm", "progress bars").tqdm(total=len(events), desc=path.name, unit=" rows", leave=False)
    for _, is_item, payload in events:
        if bar is not None:
            bar.update()
        if not is_item:
            err, raw = payload
            if on_error == "fail":
                raise err
            _reject(rejects, src, err.line, err.field, str(err), raw)
            continue
        item = payload
        ctx.line = item.line
        try:
            records.extend(info.convert(item.obj, ctx))
        except Rejected as rej:
            _reject(rejects, src, item.line, rej.field, rej.reason, _raw(item))
        except SchemaError as exc:
            if on_error == "fail":
                raise
            _reject(rejects, src, exc.line if exc.line is not None else item.line, exc.field, str(exc), _raw(item))
    if bar is not None:
        bar.close()
    return name


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".csv"):
        name = name.removesuffix(suffix)
    return name


def read_sources(
    inputs: Sequence[str | Path] | str | Path,
    *,
    format: str = "auto",
    kind: str | None = None,
    on_error: str = "fail",
    progress: bool = False,
) -> ReadResult:
    """Read every input into one canonical table.

    Args:
        inputs: files, folders or globs (see :func:`expand_inputs`), concatenated in order.
        format: ``"auto"`` (detect per file) or a name from :data:`FORMATS`.
        kind: force ``sft``, ``preference`` or ``target`` (default: the format's default kind).
        on_error: ``"fail"`` raises the first :class:`SchemaError`; ``"skip"`` puts bad records in
            ``rejects`` and goes on.
        progress: show a progress bar per file.

    Returns:
        A :class:`ReadResult`; uids are made unique once over all inputs (:func:`curate.schema.dedupe_uids`).
    """
    _check_args(format, kind, on_error)
    files = expand_inputs(inputs)
    records: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    formats: dict[str, str] = {}
    for path in files:
        name = _read_file(path, format, kind, on_error, records, rejects, progress)
        if name is not None:
            formats[str(path)] = name
    dedupe_uids(records)
    table = to_frame(records)
    rej = pl.DataFrame(rejects, schema=REJECT_SCHEMA) if rejects else pl.DataFrame(schema=REJECT_SCHEMA)
    return ReadResult(table=table, rejects=rej, formats=formats, files=[str(f) for f in files])


def read_source(path: str | Path, *, format: str = "auto", kind: str | None = None, on_error: str = "fail") -> ReadResult:
    """:func:`read_sources` for one file (or folder / glob)."""
    return read_sources([path], format=format, kind=kind, on_error=on_error)
