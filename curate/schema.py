"""The canonical table: column names, shapes, ``uid()``, record builders and ``validate_table()``.

One polars DataFrame holds every kind of row; columns that do not apply to a kind are null:

=============  =============================  ===========================================
column         type                           meaning
=============  =============================  ===========================================
uid            str (32 hex chars)             128-bit blake2b of the canonical content JSON
kind           str                            ``sft`` | ``preference`` | ``target``
messages       list[{role, content}]          sft: the conversation; target: the prompt turns
prompt         list[{role, content}]          preference: the shared context
chosen         list[{role, content}]          preference: preferred assistant turn(s)
rejected       list[{role, content}]          preference: dispreferred assistant turn(s)
label_source   str                            who labelled the pair (human, gpt4, ...)
annotators     list[i8]                       votes: +1 chosen, -1 rejected, 0 tie
task           str                            target task name (gsm8k, mmlu/abstract_algebra, ...)
answer         str                            target reference answer when known
source         str                            source file path
source_line    i64                            1-based line (JSONL/CSV) or element number (JSON)
source_format  str                            name of the reader that produced the row
source_id      str                            the user's own id, untouched (as text)
meta           str                            JSON object of every unknown source field
=============  =============================  ===========================================

Steps add ``<step>__keep`` (bool), ``<step>__reason`` (str) and ``<step>__score`` (f64) columns.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import polars as pl

from curate.errors import SchemaError

KINDS = ("sft", "preference", "target")
ROLES = ("system", "user", "assistant", "tool")

MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
MESSAGES = pl.List(MESSAGE)

SCHEMA: dict[str, pl.DataType] = {
    "uid": pl.Utf8,
    "kind": pl.Utf8,
    "messages": MESSAGES,
    "prompt": MESSAGES,
    "chosen": MESSAGES,
    "rejected": MESSAGES,
    "label_source": pl.Utf8,
    "annotators": pl.List(pl.Int8),
    "task": pl.Utf8,
    "answer": pl.Utf8,
    "source": pl.Utf8,
    "source_line": pl.Int64,
    "source_format": pl.Utf8,
    "source_id": pl.Utf8,
    "meta": pl.Utf8,
}
COLUMNS = tuple(SCHEMA)
STEP_SUFFIXES = ("__keep", "__reason", "__score")

# Roles as spelled by the formats we read -> canonical role.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_call": "assistant",
}

Message = dict[str, str]


def nfc(text: str) -> str:
    """Unicode NFC normalisation (the form every text is hashed in)."""
    return unicodedata.normalize("NFC", text)


#: Deepest nesting of lists/objects a record may have. Real records stay far below it (an
#: OpenAssistant tree is ~40 levels); far deeper values would exhaust the interpreter's recursion
#: limit in the JSON parser and encoder, so they are refused with a clear error instead.
MAX_JSON_DEPTH = 128
_SURROGATE = re.compile("[\ud800-\udfff]")


def _too_deep() -> SchemaError:
    return SchemaError("value nested too deeply.", expected=f"at most {MAX_JSON_DEPTH} levels of lists/objects",
                       found="deeper nesting")


def _normalise(obj: Any, depth: int = 0) -> Any:
    if isinstance(obj, str):
        return nfc(obj)
    if isinstance(obj, Mapping):
        if depth >= MAX_JSON_DEPTH:
            raise _too_deep()
        return {nfc(str(k)): _normalise(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if depth >= MAX_JSON_DEPTH:
            raise _too_deep()
        return [_normalise(v, depth + 1) for v in obj]
    return obj


def canonical_json(obj: Any) -> str:
    """Canonical JSON: NFC text, sorted keys, separators ``(",", ":")``, UTF-8 kept.

    Raises:
        SchemaError: ``obj`` nests deeper than :data:`MAX_JSON_DEPTH`, or holds a lone UTF-16
            surrogate (``"\\ud800"`` in JSON), which has no UTF-8 encoding and so no hash.
    """
    text = json.dumps(_normalise(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    bad = _SURROGATE.search(text)
    if bad:
        raise SchemaError("text holds a lone surrogate escape.", expected="valid Unicode text",
                          found=f"U+{ord(bad.group()):04X} at character {bad.start()}")
    return text


def uid(content: Mapping[str, Any]) -> str:
    """128-bit blake2b hex digest of the canonical JSON of ``content``.

    ``content`` is what :func:`content_of` returns for a record: the kind and the text fields,
    never the source file, line or the user's id, so the same example read from two files gets
    the same uid.
    """
    data = canonical_json(content).encode("utf-8")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def content_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a canonical record that defines its identity."""
    kind = record["kind"]
    if kind == "sft":
        return {"kind": kind, "messages": record["messages"]}
    if kind == "preference":
        return {
            "kind": kind,
            "prompt": record["prompt"],
            "chosen": record["chosen"],
            "rejected": record["rejected"],
        }
    if kind == "target":
        return {
            "kind": kind,
            "task": record.get("task"),
            "messages": record["messages"],
            "answer": record.get("answer"),
        }
    raise SchemaError("unknown kind.", field="kind", expected=f"one of {KINDS}", found=kind)


def message(role: str, content: str) -> Message:
    """A canonical message; ``role`` may be any alias (human, gpt, prompter, ...)."""
    canonical = ROLE_ALIASES.get(str(role).lower())
    if canonical is None:
        raise SchemaError(
            "unknown message role.", field="role", expected=f"one of {sorted(ROLE_ALIASES)}", found=role
        )
    return {"role": canonical, "content": content}


def _check_messages(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list):
        raise SchemaError("messages must be a list.", field=name, expected="a list of {role, content}", found=value)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise SchemaError(
                f"message {i} is malformed.", field=f"{name}[{i}]", expected="{role: str, content: str}", found=m
            )
        out.append(message(m["role"], m["content"]))
    return out


def make_record(
    kind: str,
    *,
    messages: Sequence[Message] | None = None,
    prompt: Sequence[Message] | None = None,
    chosen: Sequence[Message] | None = None,
    rejected: Sequence[Message] | None = None,
    label_source: str | None = None,
    annotators: Sequence[int] | None = None,
    task: str | None = None,
    answer: str | None = None,
    source: str | None = None,
    source_line: int | None = None,
    source_format: str | None = None,
    source_id: Any = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one canonical record (a dict with every column of :data:`SCHEMA`, uid filled in).

    Raises:
        SchemaError: if the fields do not fit the kind.
    """
    where = {"file": source, "line": source_line}
    if kind not in KINDS:
        raise SchemaError("unknown kind.", field="kind", expected=f"one of {KINDS}", found=kind, **where)
    try:
        rec: dict[str, Any] = dict.fromkeys(COLUMNS)
        rec["kind"] = kind
        if kind in ("sft", "target"):
            if messages is None or len(messages) == 0:
                raise SchemaError("no messages.", field="messages", expected="at least one message", found=messages)
            rec["messages"] = _check_messages(list(messages), "messages")
            if kind == "sft" and not any(m["role"] == "assistant" for m in rec["messages"]):
                raise SchemaError(
                    "an sft conversation needs an assistant turn.", field="messages",
                    expected="at least one assistant message", found=[m["role"] for m in rec["messages"]],
                )
        else:
            for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
                if value is None or len(value) == 0:
                    raise SchemaError(f"empty {name}.", field=name, expected="at least one message", found=value)
                rec[name] = _check_messages(list(value), name)
        if kind == "target":
            rec["task"] = task
            rec["answer"] = answer
        rec["label_source"] = label_source
        rec["annotators"] = list(annotators) if annotators is not None else None
        rec["source"] = source
        rec["source_line"] = source_line
        rec["source_format"] = source_format
        rec["source_id"] = None if source_id is None else str(source_id)
        rec["meta"] = canonical_json(dict(meta)) if meta else None
        rec["uid"] = uid(content_of(rec))
    except SchemaError as exc:
        if exc.file is None and source is not None:
            raise SchemaError(
                str(exc), file=source, line=source_line
            ) from None
        raise
    return rec


def dedupe_uids(records: list[dict[str, Any]]) -> None:
    """Make uids unique in place: the k-th repeat (k >= 1) of the same content gets
    ``uid({"content": ..., "repeat": k})``. The first occurrence keeps the plain content hash,
    so ids stay stable and exact duplicates stay visible to the dedup steps (which compare
    content, not uids)."""
    seen: dict[str, int] = {}
    for rec in records:
        base = rec["uid"]
        k = seen.get(base, 0)
        seen[base] = k + 1
        if k:
            rec["uid"] = uid({"content": content_of(rec), "repeat": k})


def to_frame(records: Iterable[Mapping[str, Any]]) -> pl.DataFrame:
    """Canonical records -> a polars DataFrame with exactly :data:`SCHEMA`."""
    rows = list(records)
    if not rows:
        return pl.DataFrame(schema=SCHEMA)
    return pl.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)


def empty_table() -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMA)


def validate_table(table: pl.DataFrame, *, name: str = "table") -> pl.DataFrame:
    """Check that ``table`` has every canonical column with the right dtype and unique uids.

    Returns the table unchanged so it can be used inline. Raises :class:`SchemaError` naming the
    missing or mistyped column (or the first duplicated uid).
    """
    if not isinstance(table, pl.DataFrame):
        raise SchemaError(f"{name} must be a polars DataFrame.", expected="polars.DataFrame", found=type(table).__name__)
    for col, dtype in SCHEMA.items():
        if col not in table.columns:
            raise SchemaError(f"{name} lacks a column.", field=col, expected=str(dtype), found="no such column")
        if table.schema[col] != dtype and table.schema[col] != pl.Null:
            raise SchemaError(f"{name} has a mistyped column.", field=col, expected=str(dtype), found=str(table.schema[col]))
    bad_kind = table.filter(~pl.col("kind").is_in(list(KINDS)))
    if bad_kind.height:
        raise SchemaError(
            f"{name} has an unknown kind.", line=_row_of(table, bad_kind["uid"][0]), field="kind",
            expected=f"one of {KINDS}", found=bad_kind["kind"][0],
        )
    dup = table.filter(pl.col("uid").is_duplicated())
    if dup.height:
        raise SchemaError(f"{name} has duplicated uids.", field="uid", expected="unique uids", found=dup["uid"][0])
    for col in table.columns:
        if col.endswith("__keep") and table.schema[col] != pl.Boolean:
            raise SchemaError(f"{name} has a mistyped step column.", field=col, expected="Boolean", found=str(table.schema[col]))
    return table


def _row_of(table: pl.DataFrame, uid_value: str) -> int:
    idx = table.with_row_index("_i").filter(pl.col("uid") == uid_value)["_i"]
    return int(idx[0]) + 1 if len(idx) else 0


# ---------------------------------------------------------------- text views of the table
TEXT_FIELDS = ("prompt", "response", "prompt+response", "chosen", "rejected", "conversation")


def _join(msgs: Sequence[Mapping[str, str]] | None, with_roles: bool = False) -> str:
    if not msgs:
        return ""
    if with_roles:
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs)
    return "\n\n".join(m["content"] for m in msgs)


def split_prompt_response(row: Mapping[str, Any]) -> tuple[list[Message], list[Message]]:
    """(prompt turns, response turns) of one row.

    sft: everything before the last assistant turn, and that turn. preference: prompt and chosen.
    target: the messages; the response is the reference answer when known.
    """
    kind = row["kind"]
    if kind == "preference":
        return list(row["prompt"] or []), list(row["chosen"] or [])
    msgs = list(row["messages"] or [])
    if kind == "target":
        answer = row.get("answer")
        tail = [msgs[-1]] if msgs and msgs[-1]["role"] == "assistant" else []
        head = msgs[: len(msgs) - len(tail)]
        if not tail and answer:
            tail = [{"role": "assistant", "content": answer}]
        return head, tail
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    return msgs[:last], msgs[last : last + 1]


def texts(table: pl.DataFrame, field: str = "prompt+response") -> list[str]:
    """Plain texts of each row for embedding, hashing and filtering.

    ``field`` is one of :data:`TEXT_FIELDS`: ``prompt``, ``response`` (sft: last assistant turn;
    preference: chosen; target: reference answer), ``prompt+response``, ``chosen``, ``rejected``,
    ``conversation`` (every turn with its role).
    """
    if field not in TEXT_FIELDS:
        raise SchemaError("unknown text field.", field="field", expected=f"one of {TEXT_FIELDS}", found=field)
    cols = [c for c in ("kind", "messages", "prompt", "chosen", "rejected", "answer") if c in table.columns]
    out = []
    for row in table.select(cols).iter_rows(named=True):
        row.setdefault("answer", None)
        if field in ("chosen", "rejected"):
            out.append(_join(row[field]) if row["kind"] == "preference" else _join(split_prompt_response(row)[1]))
            continue
        if field == "conversation":
            if row["kind"] == "preference":
                out.append(_join((row["prompt"] or []) + (row["chosen"] or []), with_roles=True))
            else:
                out.append(_join(row["messages"], with_roles=True))
            continue
        head, tail = split_prompt_response(row)
        if field == "prompt":
            out.append(_join(head))
        elif field == "response":
            out.append(_join(tail))
        else:
            out.append(_join(head + tail))
    return out


def step_columns(table: pl.DataFrame) -> list[str]:
    """Names of the steps whose ``__keep`` columns are in ``table``, in column order."""
    return [c[: -len("__keep")] for c in table.columns if c.endswith("__keep")]
