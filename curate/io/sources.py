"""Sources beyond local files: in-memory data, fsspec URIs, ``save_to_disk`` folders, field maps.

:func:`read_sources` is the public reader. Every input goes through the same format detectors and
converters as a local file (:mod:`curate.io.formats`), so a row read from a ``datasets.Dataset``, a
polars or pandas DataFrame, a list of dicts, a ``memory://`` / ``s3://`` / ``hf://`` URI or a
``Dataset.save_to_disk`` folder gets the same canonical record, hence the same uid, as the same
row read from a JSONL file. Errors in in-memory data name the input and the 0-based row index
(``<polars.DataFrame> row 3, field 'output': ...``) where file errors name ``file:line``.

Remote files are fetched with fsspec once per process into a temporary folder (nothing is
fetched unless a URI is named). In-memory data is converted in batches of
:data:`BATCH_ROWS` rows (Arrow record batches, polars slices), so the source is never copied
whole into Python objects on top of the records it yields.

``map`` renames source fields before detection, for shapes no detector knows:
``{"prompt": "question", "response": "answer"}`` reads ``question`` as the prompt and ``answer``
as the response (the Alpaca converter then builds the conversation).
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from curate.errors import ParameterError, RecipeError, SchemaError
from curate.io.detect import RAW_LIMIT, Item, Loaded, container_of, detect_items, is_data_file, load
from curate.io.formats import FORMATS, Ctx, Rejected
from curate.io.plugins import load_format_plugins
from curate.io.readers import REJECT_SCHEMA, ReadResult, expand_inputs
from curate.io.readers import read_sources as read_files
from curate.schema import KINDS, content_of, dedupe_uids, to_frame, uid

BATCH_ROWS = 10_000
#: The names ``map`` may give a source field (the keys the built-in detectors look for).
MAP_TARGETS = ("prompt", "response", "system", "history", "chosen", "rejected", "messages", "conversations",
               "instruction", "input", "output", "question", "answer", "id", "task", "text")
INPUT_KEYS = ("path", "hub", "data", "format", "kind", "sample", "split", "revision", "config", "map")


# ----------------------------------------------------------------------------- what an input is
def is_uri(value: Any) -> bool:
    """Whether ``value`` is an fsspec URL (``s3://``, ``gs://``, ``https://``, ``hf://``, ``memory://``)."""
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


def is_in_memory(value: Any) -> bool:
    """Whether ``value`` is data rather than a path (a Dataset, a DataFrame, a list of dicts, ...)."""
    return not isinstance(value, (str, os.PathLike))


def is_saved_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()
                           or (p / "dataset_dict.json").is_file())


def describe_data(obj: Any) -> str:
    """A short label of an in-memory input, used as its ``source``: ``<polars.DataFrame>``."""
    kind = f"{type(obj).__module__.split('.')[0]}.{type(obj).__name__}"
    if isinstance(obj, (list, tuple)):
        kind = "list"
    split = getattr(obj, "split", None)
    return f"<{kind} {split}>" if split else f"<{kind}>"


def _single_split(obj: Any, label: str) -> Any:
    splits = list(obj.keys())
    if len(splits) != 1:
        raise SchemaError("a DatasetDict holds several splits.", file=label, expected="one split, e.g. data['train'] "
                          "(or split: in a recipe input)", found=f"splits {splits}")
    return obj[splits[0]]


def row_batches(obj: Any, label: str = "", batch_rows: int = BATCH_ROWS) -> Iterator[list[Any]]:
    """The rows of an in-memory input as lists of Python objects, ``batch_rows`` at a time.

    Accepts a ``datasets.Dataset`` / single-split ``DatasetDict`` / ``IterableDataset``, a polars
    DataFrame or LazyFrame, a pandas DataFrame, a pyarrow Table, or a list of dicts (any iterable of
    records).
    """
    label = label or describe_data(obj)
    mod = type(obj).__module__.split(".")[0]
    name = type(obj).__name__
    if mod == "datasets" and name in ("DatasetDict", "IterableDatasetDict"):
        obj = _single_split(obj, label)
        name = type(obj).__name__
    if mod == "datasets" and name == "Dataset":
        # arrow batches honour an indices mapping (select/shuffle) and never format to numpy
        for batch in obj.with_format("arrow").iter(batch_size=batch_rows):
            yield batch.to_pylist()
        return
    if isinstance(obj, pl.LazyFrame):
        obj = obj.collect()
    if isinstance(obj, pl.DataFrame):
        for part in obj.iter_slices(batch_rows):
            yield part.to_dicts()
        return
    if mod == "pandas" and name == "DataFrame":
        import pyarrow as pa

        obj = pa.Table.from_pandas(obj, preserve_index=False)
        mod, name = "pyarrow", "Table"
    if mod == "pyarrow" and name == "Table":
        for rb in obj.to_batches(max_chunksize=batch_rows):
            yield rb.to_pylist()
        return
    if isinstance(obj, (str, bytes, Mapping)) or not isinstance(obj, Iterable):
        raise SchemaError("unsupported input.", file=label, expected="a path, URI, datasets.Dataset, polars or pandas "
                          "DataFrame, pyarrow Table or list of dicts", found=type(obj).__name__)
    batch: list[Any] = []
    for row in obj:  # a list of dicts, an IterableDataset, a generator
        batch.append(row)
        if len(batch) >= batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def data_hash(obj: Any) -> str:
    """sha256 of the rows of an in-memory input (canonical JSON per row): its identity in cache keys."""
    h = hashlib.sha256()
    for batch in row_batches(obj):
        for row in batch:
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
            h.update(b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------- field maps
def parse_map(value: Mapping[str, str] | Sequence[str] | None, where: str = "map") -> dict[str, str] | None:
    """``{"prompt": "question"}`` or ``["prompt=question", ...]`` -> a validated target -> source map."""
    if not value:
        return None
    pairs: dict[str, str] = {}
    items = value.items() if isinstance(value, Mapping) else [_split_pair(v, where) for v in value]
    for target, source in items:
        if target not in MAP_TARGETS:
            raise ParameterError(f"{where}: cannot map to '{target}'. Targets: {', '.join(MAP_TARGETS)}.")
        if not isinstance(source, str) or not source:
            raise ParameterError(f"{where}: '{target}' must name a source field. Got {source!r}.")
        pairs[str(target)] = source
    return pairs


def _split_pair(text: str, where: str) -> tuple[str, str]:
    if not isinstance(text, str) or "=" not in text:
        raise ParameterError(f"{where}: expected TARGET=SOURCE (e.g. prompt=question). Got {text!r}.")
    target, source = text.split("=", 1)
    return target.strip(), source.strip()


def apply_map(obj: Any, mapping: Mapping[str, str], source: str, line: int) -> Any:
    """``obj`` with ``mapping``'s source fields renamed to their targets (a mapped name replaces a
    field of that name). ``prompt`` + ``response`` become Alpaca's ``instruction`` + ``output``
    unless the row is a pair (``chosen`` / ``rejected``), so the Alpaca converter reads it."""
    if not isinstance(obj, Mapping):
        raise SchemaError("record is not an object.", file=source, line=line, expected="an object to map fields of",
                          found=type(obj).__name__)
    sources = set(mapping.values())
    out = {k: v for k, v in obj.items() if k not in sources}
    for target, src in mapping.items():
        if src not in obj:
            raise SchemaError("mapped field missing.", file=source, line=line, field=src,
                              expected=f"a field '{src}' (map {target}={src})",
                              found="keys " + ", ".join(sorted(map(str, obj))[:12]))
        out[target] = obj[src]
    if "response" in out and "chosen" not in out and "rejected" not in out and "output" not in out:
        out["output"] = out.pop("response")
        if "prompt" in out and "instruction" not in out:
            out["instruction"] = out.pop("prompt")
    return out


# ----------------------------------------------------------------------------- remote files
_FETCHED: dict[str, list[tuple[str, Path]]] = {}
_TMP: list[str] = []


def _tmpdir() -> Path:
    if not _TMP:
        _TMP.append(tempfile.mkdtemp(prefix="curate-remote-"))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return Path(_TMP[0])


def fetch(uri: str) -> list[tuple[str, Path]]:
    """Download the data files named by an fsspec URI (a file, a folder or a glob) once per process.

    Returns ``(url, local copy)`` pairs in sorted order; the copy keeps the file name, so the
    container is known from its suffix as for a local file.

    Raises:
        SchemaError: the URI names nothing, or its filesystem cannot be opened.
    """
    if uri in _FETCHED:
        return _FETCHED[uri]
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
        if glob.has_magic(root):
            found = sorted(fs.glob(root))
        elif fs.isdir(root):
            found = sorted(fs.find(root))
        elif fs.exists(root):
            found = [root]
        else:
            found = []
    except (ImportError, ValueError, OSError) as exc:
        raise SchemaError(f"cannot open the URI ({type(exc).__name__}: {exc}).", file=uri,
                          expected="a reachable fsspec URL with its filesystem installed (s3fs, gcsfs, ...)",
                          found=type(exc).__name__) from None
    files = [f for f in found if is_data_file(f) and not fs.isdir(f)]
    if not files:
        raise SchemaError("input not found.", file=uri, expected="a data file, folder or glob at that URI",
                          found="nothing" if not found else f"{len(found)} entries, none a data file")
    out = []
    for i, rpath in enumerate(files):
        local = _tmpdir() / hashlib.blake2b(f"{uri}\n{i}".encode(), digest_size=8).hexdigest() / Path(rpath).name
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(rpath, str(local))
        out.append((uri if len(files) == 1 and rpath == root else fs.unstrip_protocol(rpath), local))
    _FETCHED[uri] = out
    return out


def _relabel(exc: SchemaError, old: str, new: str) -> SchemaError:
    """``exc`` with file ``old`` renamed ``new`` (a fetched copy named by its URL)."""
    if exc.file != old:
        return exc
    out = SchemaError(str(exc).replace(old, new, 1))
    out.file, out.line, out.field, out.expected, out.found = new, exc.line, exc.field, exc.expected, exc.found
    return out


def _row_error(exc: SchemaError, label: str) -> SchemaError:
    """An error about in-memory data: ``label row i`` instead of ``label:i``."""
    if exc.file != label or exc.line is None:
        return exc
    text = str(exc)
    prefix = f"{label}:{exc.line}"
    out = SchemaError(f"{label} row {exc.line}{text[len(prefix):]}" if text.startswith(prefix) else text)
    out.file, out.line, out.field, out.expected, out.found = label, exc.line, exc.field, exc.expected, exc.found
    return out


# ----------------------------------------------------------------------------- conversion
@dataclass
class _Sink:
    """Where converted records go: every :data:`BATCH_ROWS` records become a polars frame, so a
    large input never holds all its rows as Python dicts at once (uids stay content hashes here;
    :func:`unique_uid_column` numbers the repeats once at the end)."""

    on_error: str
    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    frames: list[pl.DataFrame] = field(default_factory=list)

    def add(self, records: list[dict[str, Any]]) -> None:
        self.records.extend(records)
        if len(self.records) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.records:
            self.frames.append(to_frame(self.records))
            self.records = []

    def add_table(self, table: pl.DataFrame) -> None:
        """A table from the file reader, whose repeats carry renamed uids: back to content hashes."""
        self.flush()
        recs = table.to_dicts()
        for rec in recs:
            rec["uid"] = uid(content_of(rec))
        self.frames.append(to_frame(recs))

    def table(self) -> pl.DataFrame:
        self.flush()
        return unique_uid_column(pl.concat(self.frames, how="vertical") if self.frames else to_frame([]))

    def reject(self, source: str, line: int | None, fld: str | None, reason: str, raw: str) -> None:
        self.rejects.append({"source": source, "source_line": line, "field": fld, "reason": reason,
                             "raw": raw[:RAW_LIMIT]})

    def fail_or_reject(self, exc: SchemaError, source: str, line: int | None, raw: str) -> None:
        if self.on_error == "fail":
            raise exc
        self.reject(source, exc.line if exc.line is not None else line, exc.field, str(exc), raw)


def _raw(obj: Any) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, default=str)[:RAW_LIMIT]
    except (TypeError, ValueError):
        return repr(obj)[:RAW_LIMIT]


def _convert(label: str, events: Iterable[tuple[Item | None, tuple[SchemaError, str] | None]], *, format: str,
             kind: str | None, mapping: dict[str, str] | None, sink: _Sink, rows: bool, stem: str) -> str | None:
    """Detect the format from the first record and convert every record, as the file reader does.

    ``events`` yields ``(item, None)`` for a record and ``(None, (error, raw))`` for a record that
    did not parse, in source order. Returns the format used, or None when nothing was readable.
    """
    fix = (lambda e: _row_error(e, label)) if rows else (lambda e: e)
    info = ctx = None
    name: str | None = None
    for item, bad in events:
        if bad is not None:
            sink.fail_or_reject(fix(bad[0]), label, bad[0].line, bad[1])
            continue
        assert item is not None
        obj = item.obj
        try:
            if mapping:
                obj = apply_map(obj, mapping, label, item.line)
            if info is None:
                name = format if format != "auto" else detect_items(label, [Item(item.line, obj, item.raw)])
                info = FORMATS[name]
                use_kind = kind or info.default_kind
                if use_kind not in info.kinds:
                    raise SchemaError(f"format '{name}' cannot give rows of this kind.", file=label, field="kind",
                                      expected=f"one of {info.kinds}", found=use_kind)
                ctx = Ctx(source=label, line=0, format=name, kind=use_kind, stem=stem)
            assert ctx is not None
            ctx.line = item.line
            sink.add(info.convert(obj, ctx))
        except Rejected as rej:
            sink.reject(label, item.line, rej.field, rej.reason, item.raw or _raw(item.obj))
        except SchemaError as exc:
            if info is None and exc.field == "kind":
                raise fix(exc) from None
            sink.fail_or_reject(fix(exc), label, item.line, item.raw or _raw(item.obj))
    return name


def _memory_events(obj: Any, label: str) -> Iterator[tuple[Item | None, None]]:
    row = 0
    for batch in row_batches(obj, label):
        for rec in batch:
            yield Item(row, rec, ""), None
            row += 1


def _loaded_events(loaded: Loaded) -> list[tuple[Item | None, tuple[SchemaError, str] | None]]:
    events: list[tuple[int, int, Any]] = [(e.line or 0, 0, (e, raw)) for e, raw in loaded.errors]
    events += [(it.line, 1, it) for it in loaded.items]
    events.sort(key=lambda ev: (ev[0], ev[1]))
    return [(p, None) if is_item else (None, p) for _, is_item, p in events]


def _stem(name: str) -> str:
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".csv"):
        name = name.removesuffix(suffix)
    return name


def _is_parquet(path: str | os.PathLike[str]) -> bool:
    return container_of(path)[0] == "parquet"


def _parquet_events(path: Path, label: str) -> Iterator[tuple[Item | None, None]]:
    """Rows of a parquet file, one Arrow record batch at a time (never the whole file as Python
    objects); row numbers are 1-based as for every file."""
    import pyarrow.parquet as pq

    line = 1
    try:
        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows == 0:
            raise SchemaError("the file is empty.", file=label, expected="at least one record", found="no records")
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                yield Item(line, row, ""), None
                line += 1
    except SchemaError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise SchemaError(f"cannot read parquet ({exc}).", file=label, expected="a parquet file",
                          found=type(exc).__name__) from None


def _read_file_mapped(path: Path, label: str, *, format: str, kind: str | None, mapping: dict[str, str] | None,
                      sink: _Sink) -> str | None:
    if _is_parquet(path):
        try:
            return _convert(label, _parquet_events(Path(path), label), format=format, kind=kind, mapping=mapping,
                            sink=sink, rows=False, stem=_stem(Path(path).name))
        except SchemaError as exc:  # a whole-file problem (empty, corrupt): like any unreadable file
            if exc.file != label or exc.line is not None or exc.field is not None:
                raise
            sink.fail_or_reject(exc, label, None, "")
            return None
    try:
        loaded = load(path)
    except SchemaError as exc:
        sink.fail_or_reject(_relabel(exc, str(path), label), label, exc.line, "")
        return None
    loaded.errors = [(_relabel(e, str(path), label), raw) for e, raw in loaded.errors]
    if not loaded.items and loaded.errors and sink.on_error == "fail":
        raise loaded.errors[0][0]
    return _convert(label, _loaded_events(loaded), format=format, kind=kind, mapping=mapping, sink=sink,
                    rows=False, stem=_stem(Path(path).name))


def _load_saved(path: str | os.PathLike[str], split: str | None) -> Any:
    from curate._lazy import require

    ds = require("datasets", "reading a save_to_disk folder").load_from_disk(str(path))
    if hasattr(ds, "keys"):
        if split is not None:
            if split not in ds:
                raise SchemaError("no such split.", file=str(path), field="split", expected=f"one of {list(ds)}",
                                  found=split)
            return ds[split]
        return _single_split(ds, str(path))
    return ds


def _plain_local(inp: Any) -> bool:
    return not is_in_memory(inp) and not is_uri(inp) and not is_saved_dataset(inp)


def _as_list(inputs: Any) -> list[Any]:
    if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, (list, tuple)):
        return [inputs]
    if inputs and all(isinstance(x, Mapping) for x in inputs):
        return [list(inputs)]  # one in-memory input: a list of records
    return list(inputs)


def read_sources(
    inputs: Any,
    *,
    format: str = "auto",
    kind: str | None = None,
    on_error: str = "fail",
    progress: bool = False,
    map: Mapping[str, str] | Sequence[str] | None = None,
    split: str | None = None,
) -> ReadResult:
    """Read every input into one canonical table.

    Args:
        inputs: one input or a list of them, concatenated in order. An input is a local file,
            folder or glob; an fsspec URI (``s3://``, ``gs://``, ``https://``,
            ``hf://datasets/<repo>[@rev]/<glob>``, ``memory://``); a ``save_to_disk`` folder; or
            in-memory data: a ``datasets.Dataset`` (or one-split ``DatasetDict``), a polars or
            pandas DataFrame, a pyarrow Table, a list of dicts.
        format: ``"auto"`` (detect per input) or a format name (see ``curate list formats``).
        kind: force ``sft``, ``preference`` or ``target``.
        on_error: ``"fail"`` raises the first :class:`SchemaError`; ``"skip"`` puts bad records in
            ``rejects`` and goes on.
        progress: progress bars for files.
        map: target -> source field renames applied before detection (``{"prompt": "question"}``
            or ``["prompt=question"]``); see :func:`apply_map`.
        split: the split of a ``save_to_disk`` DatasetDict folder.

    Returns:
        A :class:`~curate.io.readers.ReadResult`. In-memory rows have ``source`` = the input's label
        and ``source_line`` = the 0-based row index. uids are unique over all inputs.
    """
    load_format_plugins()  # installed formats (entry points) join detection before the first read
    items = _as_list(inputs)
    mapping = parse_map(map)
    if (all(_plain_local(i) for i in items) and mapping is None
            and not any(_is_parquet(p) for p in expand_inputs([str(i) for i in items]))):
        return read_files([str(i) for i in items], format=format, kind=kind, on_error=on_error, progress=progress)
    if format != "auto" and format not in FORMATS:
        raise ParameterError(f"The 'format' parameter of read_sources must be 'auto' or one of {sorted(FORMATS)}. "
                             f"Got {format!r}.")
    if kind is not None and kind not in KINDS:
        raise ParameterError(f"The 'kind' parameter of read_sources must be None or one of {KINDS}. Got {kind!r}.")
    if on_error not in ("fail", "skip"):
        raise ParameterError(f"The 'on_error' parameter of read_sources must be 'fail' or 'skip'. Got {on_error!r}.")
    sink = _Sink(on_error)
    formats: dict[str, str] = {}
    files: list[str] = []
    labels: dict[str, int] = {}
    for inp in items:
        if is_in_memory(inp):
            label = describe_data(inp)
            labels[label] = labels.get(label, 0) + 1
            if labels[label] > 1:
                label = f"{label[:-1]} #{labels[label]}>"
            name = _convert(label, _memory_events(inp, label), format=format, kind=kind, mapping=mapping, sink=sink,
                            rows=True, stem=str(getattr(inp, "split", "") or ""))
            found = [(label, name)]
        elif is_uri(inp):
            found = [(url, _read_file_mapped(local, url, format=format, kind=kind, mapping=mapping, sink=sink))
                     for url, local in fetch(str(inp))]
        elif is_saved_dataset(inp):
            label = str(inp)
            name = _convert(label, _memory_events(_load_saved(inp, split), label), format=format, kind=kind,
                            mapping=mapping, sink=sink, rows=True, stem=Path(inp).name)
            found = [(label, name)]
        else:
            found = []
            for p in expand_inputs([inp]):
                if mapping is not None or _is_parquet(p):
                    found.append((str(p), _read_file_mapped(p, str(p), format=format, kind=kind, mapping=mapping,
                                                            sink=sink)))
                    continue
                res = read_files([str(p)], format=format, kind=kind, on_error=on_error, progress=progress)
                sink.add_table(res.table)
                sink.rejects += res.rejects.to_dicts()
                formats.update(res.formats)
                files += res.files
        for label, name in found:
            files.append(label)
            if name is not None:
                formats[label] = name
    table = sink.table()
    rej = pl.DataFrame(sink.rejects, schema=REJECT_SCHEMA) if sink.rejects else pl.DataFrame(schema=REJECT_SCHEMA)
    return ReadResult(table=table, rejects=rej, formats=formats, files=files)


def unique_uid_column(table: pl.DataFrame) -> pl.DataFrame:
    """``table`` (uids = content hashes) with the k-th repeat (k >= 1) of a uid renamed
    ``uid({"content": ..., "repeat": k})`` in row order, as :func:`curate.schema.dedupe_uids` does;
    only the repeated rows are turned back into Python objects."""
    if table.height == 0:
        return table
    k = table.select(pl.int_range(pl.len()).over("uid").alias("k"))["k"]
    idx = (k > 0).arg_true()
    if idx.len() == 0:
        return table
    rows = table[idx].to_dicts()
    new = [uid({"content": content_of(r), "repeat": int(n)}) for r, n in zip(rows, k.gather(idx).to_list())]
    return table.with_columns(table["uid"].scatter(idx, pl.Series(new, dtype=pl.Utf8)))


def unique_uids(records: list[dict[str, Any]]) -> None:
    """Make uids unique over records gathered from several reads: each record's uid is first reset
    to its content hash, so a repeat already renamed inside one input cannot collide with a repeat
    renamed across inputs (:func:`curate.schema.dedupe_uids` then numbers the repeats once)."""
    for rec in records:
        rec["uid"] = uid(content_of(rec))
    dedupe_uids(records)


def check_input_keys(item: Mapping[str, Any], where: str) -> None:
    """Raise a :class:`RecipeError` for keys an input mapping may not have."""
    unknown = sorted(set(item) - set(INPUT_KEYS))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}. Valid keys: {list(INPUT_KEYS)}. "
                          "(In-memory rows go under 'data:', e.g. {data: rows}.)")
