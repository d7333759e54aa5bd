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
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.errors import SchemaError
from curate.schema import MAX_JSON_DEPTH

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


# ----------------------------------------------------------------------------- hostile values
# Three kinds of JSON parse cleanly (or almost) yet break later stages: a lone UTF-16 surrogate
# escape ("\ud800": no UTF-8 encoding, so no hash and no parquet string), nesting deep enough to
# exhaust the interpreter's recursion limit, and integer literals longer than Python converts
# (sys.get_int_max_str_digits(), 4,300 by default). Each is found per record and reported as a row
# error naming its field, so one such line never aborts the read.
_SURROGATE = re.compile("[\ud800-\udfff]")
_WS = re.compile(r"[ \t\n\r]*")


class HugeInt:
    """Stands in for an integer literal too long to convert, so the record can be rejected naming
    the field instead of the whole parse failing."""

    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(text: str) -> int | HugeInt:
    try:
        return int(text)
    except ValueError:  # over the interpreter's digit limit
        return HugeInt(len(text.lstrip("-")))


def loads(text: str) -> Any:
    """``json.loads``, except that an integer literal over the digit limit parses to a
    :class:`HugeInt` (found later by :func:`value_problem`). Raises ``json.JSONDecodeError`` for
    malformed text and ``RecursionError`` for runaway nesting."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # the digit limit; parse again keeping the long literal as a marker
        return json.loads(text, parse_int=_parse_int)


def value_problem(obj: Any) -> tuple[str | None, str, str, str] | None:
    """The first hostile value in ``obj`` in document order, as ``(field path, message, expected,
    found)``, or None. Iterative, so any depth is safe to inspect."""
    stack: list[tuple[Any, str, int, str]] = [(obj, "", 0, "")]  # value, path, depth, top-level key
    while stack:
        value, path, depth, top = stack.pop()
        if isinstance(value, str):
            bad = _SURROGATE.search(value)
            if bad:
                return (path or None, "text holds a lone surrogate escape.", "valid Unicode text",
                        f"U+{ord(bad.group()):04X} at character {bad.start()}")
        elif isinstance(value, HugeInt):
            return (path or None, "integer literal too long.", f"at most {sys.get_int_max_str_digits()} digits",
                    f"{value.digits} digits")
        elif isinstance(value, (Mapping, list)):
            if depth >= MAX_JSON_DEPTH:
                return (top or None, "value nested too deeply.",
                        f"at most {MAX_JSON_DEPTH} levels of lists/objects", "deeper nesting")
            if isinstance(value, Mapping):
                children = []
                for k, v in value.items():
                    if isinstance(k, str) and _SURROGATE.search(k):
                        return (path or None, "key holds a lone surrogate escape.", "valid Unicode text",
                                ascii(k)[1:-1])
                    children.append((v, f"{path}.{k}" if path else str(k), depth + 1, top or str(k)))
            else:
                children = [(v, f"{path}[{i}]", depth + 1, top) for i, v in enumerate(value)]
            stack.extend(reversed(children))
    return None


def _string_end(text: str, i: int) -> int:
    """Index just past the JSON string that starts with the quote at ``i``."""
    n = len(text)
    j = i + 1
    while j < n and text[j] != '"':
        j += 2 if text[j] == "\\" else 1
    return j + 1


def deep_field(text: str) -> str | None:
    """The top-level key under which ``text`` (one JSON object) first nests deeper than
    :data:`MAX_JSON_DEPTH`; None when it is not an object. Scans the text (no recursion)."""
    depth, key, i, n = 0, None, 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = _string_end(text, i)
            k = _WS.match(text, j).end()
            if depth == 1 and text[k:k + 1] == ":":
                key = text[i + 1:j - 1]
            i = j
            continue
        if c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return ascii(key)[1:-1] if key is not None else None
        elif c in "]}":
            depth -= 1
        i += 1
    return None


def _skip_value(text: str, i: int) -> int:
    """Index just past the (nested) JSON array or object that starts at ``i``; -1 if unterminated."""
    depth, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i = _string_end(text, i)
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _too_deep(path: Path, line: int, text: str) -> SchemaError:
    return SchemaError("value nested too deeply.", file=str(path), line=line, field=deep_field(text),
                       expected=f"at most {MAX_JSON_DEPTH} levels of lists/objects", found="deeper nesting")


def _checked(path: Path, line: int, obj: Any, raw: str, loaded: Loaded) -> None:
    """Add ``obj`` as an item, or as a row error when it holds a hostile value."""
    problem = value_problem(obj)
    if problem is None:
        loaded.items.append(Item(line, obj, raw))
        return
    field_, message, expected, found = problem
    err = SchemaError(message, file=str(path), line=line, field=field_, expected=expected, found=found)
    loaded.errors.append((err, raw or _safe_raw(obj)))


def _safe_raw(obj: Any) -> str:
    try:
        return json.dumps(obj, ensure_ascii=True, default=repr)[:RAW_LIMIT]
    except (RecursionError, ValueError):
        return "<not shown: nested too deeply>"


def _parse_jsonl(path: Path, data: bytes, loaded: Loaded) -> None:
    for line, text in _decode_lines(path, data, loaded):
        if not text.strip():
            continue
        try:
            obj = loads(text)
        except json.JSONDecodeError as exc:
            err = SchemaError(f"malformed JSON ({exc.msg} at column {exc.colno}).", file=str(path), line=line,
                              expected="one complete JSON value per line", found=text[:60])
            loaded.errors.append((err, text[:RAW_LIMIT]))
            continue
        except RecursionError:
            loaded.errors.append((_too_deep(path, line, text), text[:RAW_LIMIT]))
            continue
        _checked(path, line, obj, text[:RAW_LIMIT], loaded)


_WRAPPER_KEYS = ("examples", "data", "instances", "rows", "records", "items")


def _parse_json(path: Path, data: bytes, loaded: Loaded) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_utf8(path, data, exc) from None
    try:
        doc = loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines under a .json name
            loaded.container = "jsonl"
            _parse_jsonl(path, data, loaded)
            return
        raise SchemaError(f"malformed JSON ({exc.msg} at column {exc.colno}).", file=str(path), line=exc.lineno,
                          expected="a JSON array or object", found=text[max(0, exc.pos - 30):exc.pos + 30]) from None
    except RecursionError:
        if text.lstrip().startswith("["):  # one element nests too deeply: report it, keep the others
            _parse_elements(path, text, loaded)
            return
        raise _too_deep(path, 1, text) from None
    if isinstance(doc, Mapping):
        lists = [k for k in _WRAPPER_KEYS if isinstance(doc.get(k), list)]
        doc = doc[lists[0]] if lists else [doc]
    if not isinstance(doc, list):
        raise SchemaError("unexpected JSON document.", file=str(path), line=1, expected="an array of records or an object",
                          found=f"{type(doc).__name__} {doc!r}")
    for i, obj in enumerate(doc, start=1):
        _checked(path, i, obj, "", loaded)


def _parse_elements(path: Path, text: str, loaded: Loaded) -> None:
    """A JSON array element by element (the slow path, taken only when the whole document does not
    parse because one element nests too deeply): that element becomes a row error."""
    decoder = json.JSONDecoder(parse_int=_parse_int)

    def malformed(pos: int) -> SchemaError:
        line = text.count("\n", 0, pos) + 1
        return SchemaError("malformed JSON.", file=str(path), line=line, expected="a JSON array of records",
                           found=ascii(text[max(0, pos - 30):pos + 30]))

    pos = _WS.match(text, text.index("[") + 1).end()
    if text[pos:pos + 1] == "]":
        return
    element = 0
    while True:
        element += 1
        try:
            obj, end = decoder.raw_decode(text, pos)
            _checked(path, element, obj, "", loaded)
        except RecursionError:
            end = _skip_value(text, pos)
            if end < 0:
                raise malformed(pos) from None
            loaded.errors.append((_too_deep(path, element, text[pos:end]), "<not shown: nested too deeply>"))
        except json.JSONDecodeError as exc:
            raise malformed(exc.pos) from None
        pos = _WS.match(text, end).end()
        sep = text[pos:pos + 1]
        if sep == "]":
            return
        if sep != ",":
            raise malformed(pos)
        pos = _WS.match(text, pos + 1).end()


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
    # the csv module refuses fields over 128 KiB by default; a long response is a valid field, and
    # the whole file is already in memory, so no field can be larger than it
    csv.field_size_limit(max(csv.field_size_limit(), min(len(data) + 1, 2**31 - 1)))
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
