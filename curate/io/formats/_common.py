"""Shared helpers of the source-format converters: field access with clear errors, message
normalisation, and the two record builders every converter ends in."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from curate.errors import SchemaError
from curate.schema import Message, make_record, message

#: Keys that carry the user's own id, in the order they are looked for (the first present wins).
ID_KEYS = ("id", "idx", "question_id", "task_id", "key", "message_id", "uid")


class Rejected(Exception):
    """A well-formed record that does not yield a row (a tie, prompts that differ, ...).

    Unlike :class:`SchemaError` it never stops a read, even with ``on_error="fail"``: the record
    goes to ``rejects`` with ``reason`` so nothing is dropped silently.
    """

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.field = reason, field


@dataclass
class Ctx:
    """Where a record comes from, passed to every converter."""

    source: str
    line: int
    format: str
    kind: str
    stem: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def error(self, message: str, *, field: str | None = None, expected: str | None = None, found: Any = None) -> SchemaError:
        return SchemaError(message, file=self.source, line=self.line, field=field, expected=expected, found=found)


@dataclass(frozen=True)
class FormatInfo:
    """A source format: what it is, what it can produce, how to spot it and how to convert it.

    ``convert(obj, ctx)`` turns one source record into zero or more canonical records (a tree can
    give many pairs); ``detect(obj)`` says whether a first record looks like this format.
    """

    name: str
    description: str
    kinds: tuple[str, ...]
    default_kind: str
    detect: Callable[[Any], bool]
    convert: Callable[[Any, Ctx], list[dict[str, Any]]]
    containers: tuple[str, ...] = ("json", "jsonl", "parquet", "csv")


# ----------------------------------------------------------------------------- field access
def need(obj: Mapping[str, Any], key: str, ctx: Ctx, types: type | tuple[type, ...] = str, what: str = "a string") -> Any:
    """``obj[key]``, raising a :class:`SchemaError` naming the field when missing or mistyped."""
    if key not in obj or obj[key] is None:
        raise ctx.error("missing field.", field=key, expected=what, found="nothing")
    value = obj[key]
    if not isinstance(value, types) or (types is int and isinstance(value, bool)):
        raise ctx.error("wrong type.", field=key, expected=what, found=f"{type(value).__name__} {value!r}")
    return value


def opt(obj: Mapping[str, Any], key: str, ctx: Ctx, types: type | tuple[type, ...] = str, what: str = "a string") -> Any:
    """``obj[key]`` or None when absent/null; mistyped values raise like :func:`need`."""
    if obj.get(key) is None:
        return None
    return need(obj, key, ctx, types, what)


def need_dict(obj: Any, ctx: Ctx) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ctx.error("record is not an object.", expected="a JSON object", found=f"{type(obj).__name__} {obj!r}")
    return obj


def source_id(obj: Mapping[str, Any], keys: Sequence[str] = ID_KEYS) -> tuple[Any, str | None]:
    for k in keys:
        if obj.get(k) is not None:
            return obj[k], k
    return None, None


def meta_of(obj: Mapping[str, Any], known: Sequence[str] | set[str], **extra: Any) -> dict[str, Any]:
    """Every field of ``obj`` not in ``known`` (made JSON-safe), plus ``extra``."""
    out = {k: _json_safe(v) for k, v in obj.items() if k not in known}
    out.update({k: _json_safe(v) for k, v in extra.items() if v is not None})
    return out


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))


def text_of(content: Any, ctx: Ctx, name: str) -> str:
    """Message content as text: a string, or a list of ``{type: text, text|value}`` parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
                continue
            if not isinstance(part, Mapping) or part.get("type", "text") != "text":
                raise ctx.error("unsupported content part.", field=f"{name}[{i}]",
                                expected="a {type: 'text', text|value: str} part", found=part)
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise ctx.error("content part without text.", field=f"{name}[{i}]", expected="'text' or 'value' string", found=part)
            parts.append(text)
        return "\n".join(parts)
    raise ctx.error("wrong type.", field=name, expected="a string or a list of text parts", found=f"{type(content).__name__} {content!r}")


def messages_of(value: Any, ctx: Ctx, name: str, *, role_key: str = "role", content_key: str = "content") -> list[Message]:
    """A list of ``{role, content}`` (or ``{from, value}``) dicts -> canonical messages."""
    if not isinstance(value, list):
        raise ctx.error("wrong type.", field=name, expected="a list of messages", found=f"{type(value).__name__} {value!r}")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, Mapping):
            raise ctx.error("message is not an object.", field=where, expected=f"{{{role_key}, {content_key}}}", found=m)
        role = m.get(role_key)
        if not isinstance(role, str):
            raise ctx.error("message without a role.", field=f"{where}.{role_key}", expected="a role string", found=role)
        if content_key not in m:
            raise ctx.error("message without content.", field=f"{where}.{content_key}", expected="a string", found="nothing")
        try:
            out.append(message(role, text_of(m[content_key], ctx, f"{where}.{content_key}")))
        except SchemaError as exc:
            if exc.file is not None:
                raise
            raise ctx.error(str(exc), field=f"{where}.{role_key}") from None
    return out


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def join_prompt(instruction: str, inp: str | None) -> str:
    """Alpaca convention: the instruction, then a blank line and the input when there is one."""
    return f"{instruction}\n\n{inp}" if inp else instruction


# ----------------------------------------------------------------------------- record builders
def _record(ctx: Ctx, kind: str, **kw: Any) -> dict[str, Any]:
    try:
        return make_record(kind, source=ctx.source, source_line=ctx.line, source_format=ctx.format, **kw)
    except SchemaError as exc:
        if exc.file is None:
            raise SchemaError(str(exc), file=ctx.source, line=ctx.line, field=exc.field) from None
        raise


def conversation(
    ctx: Ctx,
    msgs: list[Message],
    *,
    answer: str | None = None,
    task: str | None = None,
    sid: Any = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A record from one conversation, shaped by ``ctx.kind``.

    sft: the turns (``answer`` appended as the assistant turn when the turns end with the user).
    target: the turns up to the last user turn; a trailing assistant turn becomes ``answer``.
    """
    msgs = list(msgs)
    if ctx.kind == "sft":
        if answer is not None and (not msgs or msgs[-1]["role"] != "assistant"):
            msgs.append(assistant(answer))
        if not any(m["role"] == "assistant" for m in msgs):
            raise ctx.error("no response to train on.", field="output", expected="an assistant reply (kind sft)",
                            found="a prompt only; use --kind target")
        return _record(ctx, "sft", messages=msgs, source_id=sid, meta=meta)
    if ctx.kind == "target":
        if msgs and msgs[-1]["role"] == "assistant" and len(msgs) > 1:
            last = msgs.pop()
            answer = last["content"] if answer is None else answer
        return _record(ctx, "target", messages=msgs, task=task or ctx.stem, answer=answer, source_id=sid, meta=meta)
    raise ctx.error("this format has no preference pairs.", field="kind", expected="sft or target", found=ctx.kind)


def pair(
    ctx: Ctx,
    prompt: list[Message],
    chosen: list[Message],
    rejected: list[Message],
    *,
    label_source: str | None = None,
    annotators: Sequence[int] | None = None,
    sid: Any = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A preference record; with kind sft the prompt + chosen conversation, with kind target the
    prompt with the chosen reply as answer."""
    if ctx.kind == "preference":
        return _record(ctx, "preference", prompt=prompt, chosen=chosen, rejected=rejected,
                       label_source=label_source, annotators=annotators, source_id=sid, meta=meta)
    answer = "\n\n".join(m["content"] for m in chosen)
    return conversation(ctx, list(prompt) + list(chosen), answer=answer if ctx.kind == "target" else None,
                        sid=sid, meta=meta)
