"""Containers (JSON, JSONL, gzip of either, Parquet, CSV) and format auto-detection.

A container is opened into a list of :class:`Item` (1-based line or element number, the parsed
object, the raw text for error reports); bad lines become :class:`SchemaError` objects that the
reader raises (``on_error="fail"``) or reports (``on_error="skip"``). The format is then detected
from the keys of the first records.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.errors import SchemaError

DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv")
RAW_LIMIT = 2000


@dataclass
class Item:
    """One source record: where it is, what it parsed to, and its raw text (for rejects)."""

    line: int
    obj: Any
    raw: str


@dataclass
class Loaded:
    """A container's records and the errors met while parsing it (each names file and line)."""

    container: str
    items: list[Item] = field(default_factory=list)
    errors: list[tuple[SchemaError, str]] = field(default_factory=list)  # (error, raw text)


def container_of(path: str | Path) -> tuple[str, bool]:
    """(container, gzipped) from the file name: ``json``, ``jsonl``, ``parquet`` or ``csv``."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for suffix, container in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet"),
                              (".csv", "csv")):
        if name.endswith(suffix):
            return container, gz
    return "unknown", gz


def is_data_file(path: str | Path) -> bool:
    """Whether a folder listing should pick this file up (data suffix, optionally ``.gz``)."""
    name = Path(path).name
    if name.startswith(".") or name.upper().startswith(("LICENSE", "README")):
        return False
    return container_of(name)[0] != "unknown"


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise SchemaError(f"cannot read the file ({exc}).", file=str(path), expected="a readable (gzip) file",
                          found=type(exc).__name__) from None
    return data.removeprefix(b"\xef\xbb\xbf")


def _empty(path: Path) -> SchemaError:
    return SchemaError("the file is empty.", file=str(path), expected="at least one record", found="no records")


def _bad_utf8(path: Path, data: bytes, exc: UnicodeDecodeError, base_line: int = 1) -> SchemaError:
    line = base_line + data[: exc.start].count(b"\n")
    return SchemaError("bytes are not valid UTF-8.", file=str(path), line=line, field=None, expected="UTF-8 text",
                       found=f"byte {data[exc.start:exc.start + 1]!r} at offset {exc.start}")


def _decode_lines(path: Path, data: bytes, loaded: Loaded) -> list[tuple[int, str]]:
    out = []
    for i, raw in enumerate(data.split(b"\n"), start=1):
        try:
            out.append((i, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            loaded.errors.append((_bad_utf8(path, raw, exc, i), raw.decode("utf-8", "replace")[:RAW_LIMIT]))
    return out


def _parse_jsonl(path: Path, data: bytes, loaded: Loaded) -> None:
    for line, text in _decode_lines(path, data, loaded):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            err = SchemaError(f"malformed JSON ({exc.msg} at column {exc.colno}).", file=str(path), line=line,
                              expected="one complete JSON value per line", found=text[:60])
            loaded.errors.append((err, text[:RAW_LIMIT]))
            continue
        loaded.items.append(Item(line, obj, text[:RAW_LIMIT]))


_WRAPPER_KEYS = ("examples", "data", "instances", "rows", "records", "items")


def _parse_json(path: Path, data: bytes, loaded: Loaded) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_utf8(path, data, exc) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines under a .json name
            loaded.container = "jsonl"
            _parse_jsonl(path, data, loaded)
            return
        raise SchemaError(f"malformed JSON ({exc.msg} at column {exc.colno}).", file=str(path), line=exc.lineno,
                          expected="a JSON array or object", found=text[max(0, exc.pos - 30):exc.pos + 30]) from None
    if isinstance(doc, Mapping):
        lists = [k for k in _WRAPPER_KEYS if isinstance(doc.get(k), list)]
        doc = doc[lists[0]] if lists else [doc]
    if not isinstance(doc, list):
        raise SchemaError("unexpected JSON document.", file=str(path), line=1, expected="an array of records or an object",
                          found=f"{type(doc).__name__} {doc!r}")
    loaded.items.extend(Item(i, obj, "") for i, obj in enumerate(doc, start=1))


def _parse_parquet(path: Path, loaded: Loaded) -> None:
    import polars as pl

    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for corrupt files
        raise SchemaError(f"cannot read parquet ({exc}).", file=str(path), expected="a parquet file",
                          found=type(exc).__name__) from None
    loaded.items.extend(Item(i, row, "") for i, row in enumerate(frame.iter_rows(named=True), start=1))


_HEADER_CELL = re.compile(r"^[A-Za-z_][\w .-]{0,63}$")
KNOWN_COLUMNS = frozenset({
    "instruction", "input", "output", "response", "question", "answer", "prompt", "chosen", "rejected", "text",
    "target", "id", "idx", "system", "completion", "label", "category", "task_id", "canonical_solution",
})


def _looks_like_header(row: list[str]) -> bool:
    cells = [c.strip() for c in row]
    return bool(cells) and all(_HEADER_CELL.match(c) for c in cells) and any(c.lower() in KNOWN_COLUMNS for c in cells)


def _parse_csv(path: Path, data: bytes, loaded: Loaded) -> None:
    lines = _decode_lines(path, data, loaded)
    text = "\n".join(t for _, t in lines)
    numbers = [n for n, _ in lines]  # physical line of each decoded line (bad lines removed)
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    prev = 0
    try:
        for row in reader:
            start = numbers[prev] if prev < len(numbers) else prev + 1  # first physical line of the row
            prev = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if header is None and not loaded.items and _looks_like_header(row):
                header = [c.strip() for c in row]
                continue
            raw = ",".join(row)[:RAW_LIMIT]
            if header is None:
                loaded.items.append(Item(start, row, raw))
            elif len(row) != len(header):
                err = SchemaError("wrong number of columns.", file=str(path), line=start, expected=f"{len(header)} columns",
                                  found=f"{len(row)}")
                loaded.errors.append((err, raw))
            else:
                loaded.items.append(Item(start, dict(zip(header, row, strict=True)), raw))
    except csv.Error as exc:
        raise SchemaError(f"malformed CSV ({exc}).", file=str(path), line=reader.line_num, expected="valid CSV",
                          found="unparseable text") from None


def load(path: str | Path) -> Loaded:
    """Open ``path`` into items. Whole-file problems (empty, not UTF-8 JSON, bad JSON document,
    unknown container) raise :class:`SchemaError`; per-line problems are collected in ``errors``."""
    path = Path(path)
    container, _ = container_of(path)
    data = b"" if container == "parquet" else _read_bytes(path)
    if container == "unknown":
        head = data.lstrip()[:1]
        if head == b"[":
            container = "json"
        elif head == b"{" or head == b'"':
            container = "jsonl"
        elif head:
            raise SchemaError("unknown container.", file=str(path), expected="a .json, .jsonl, .parquet or .csv file "
                              "(optionally .gz)", found=path.name)
    if container != "parquet" and not data.strip():
        raise _empty(path)
    loaded = Loaded(container)
    if container == "json":
        _parse_json(path, data, loaded)
    elif container == "jsonl":
        _parse_jsonl(path, data, loaded)
    elif container == "csv":
        _parse_csv(path, data, loaded)
    else:
        _parse_parquet(path, loaded)
    if not loaded.items and not loaded.errors:
        raise _empty(path)
    return loaded


def _shape(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return "an object with keys " + ", ".join(sorted(map(str, obj))[:12])
    if isinstance(obj, list):
        return f"a row of {len(obj)} values"
    return f"a {type(obj).__name__}"


def detect_items(path: str | Path, items: list[Item]) -> str:
    """The first format (in :data:`~curate.io.formats.FORMATS` order) that recognises the first record."""
    from curate.io.formats import FORMATS

    if not items:
        raise _empty(Path(path))
    first = items[0]
    for name, info in FORMATS.items():
        if info.detect(first.obj):
            return name
    raise SchemaError("unknown record shape.", file=str(path), line=first.line, field=None,
                      expected=f"the shape of a known format ({', '.join(FORMATS)}; see `curate list`)",
                      found=_shape(first.obj))


def detect_format(path: str | Path) -> str:
    """Name of the format of ``path``, from its container and the keys of its first records.

    Raises:
        SchemaError: the file is empty, unreadable, or no format recognises its records.
    """
    loaded = load(path)
    if not loaded.items and loaded.errors:
        raise loaded.errors[0][0]
    return detect_items(path, loaded.items)
