"""Exports of curated tables to trainer formats.

- ``trl``: TRL's preference format — conversational ``{"prompt": [messages], "chosen": [assistant
  messages], "rejected": [...]}`` or, with ``as_strings``, standard ``{"prompt": str, "chosen": str,
  "rejected": str}`` (prompt rendered with roles unless it is a single user turn). SFT rows become
  ``{"messages": [...]}`` (TRL's conversational language-modelling format).
- ``sharegpt``: LLaMA-Factory ShareGPT DPO — ``{"conversations": [{"from": "human"|"gpt"|..., "value"}],
  "chosen": {"from": "gpt", "value"}, "rejected": {...}}`` plus ``"system"`` when the prompt has one;
  SFT rows: ``{"conversations": [...]}``.
- ``alpaca``: LLaMA-Factory Alpaca DPO — ``{"instruction", "input": "", "chosen", "rejected",
  "history": [[user, assistant], ...], "system"}``; SFT rows have ``"output"`` instead of chosen/rejected.
- ``messages``: OpenAI-style ``{"messages": [...]}``; a pair exports prompt + chosen.

Rows are written in table order; ``curry__*`` columns, when present, are copied as ``curry_*`` keys so a
curriculum survives the export. Written atomically as ``.jsonl`` / ``.json`` / ``.parquet`` by suffix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from curate.errors import SchemaError, param_error
from curate.io.writers import atomic_path, write_parquet
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext

FORMATS = ("trl", "sharegpt", "alpaca", "messages")
_SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}


def _msgs(value: Any) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in (value or [])]


def _text(msgs: Sequence[Mapping[str, str]]) -> str:
    return "\n\n".join(m["content"] for m in msgs)


def _prompt_string(msgs: list[dict[str, str]]) -> str:
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs)


def _split_system(msgs: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system") or None
    return system, [m for m in msgs if m["role"] != "system"]


def _sides(row: Mapping[str, Any], i: int) -> tuple[list[dict[str, str]], list[dict[str, str]] | None,
                                                        list[dict[str, str]] | None]:
    """(prompt, chosen, rejected); chosen/rejected None for SFT rows (prompt = whole conversation)."""
    kind = row.get("kind")
    if kind == "preference":
        return _msgs(row["prompt"]), _msgs(row["chosen"]), _msgs(row["rejected"])
    if kind == "sft":
        return _msgs(row["messages"]), None, None
    raise SchemaError("only sft and preference rows can be exported.", line=i + 1, field="kind",
                      expected="kind 'sft' or 'preference'", found=f"{kind!r} (uid {row.get('uid')})")


def _history(msgs: list[dict[str, str]]) -> tuple[list[list[str]], str]:
    """(history pairs, last user turn) of a non-system message list."""
    if not msgs or msgs[-1]["role"] != "user":
        return [], _text(msgs)
    hist, pending = [], None
    for m in msgs[:-1]:
        if m["role"] == "user":
            pending = m["content"]
        elif m["role"] == "assistant" and pending is not None:
            hist.append([pending, m["content"]])
            pending = None
    return hist, msgs[-1]["content"]


def export_record(row: Mapping[str, Any], fmt: str, *, as_strings: bool = False, i: int = 0) -> dict[str, Any]:
    """One canonical row in format ``fmt`` (see the module docstring)."""
    prompt, chosen, rejected = _sides(row, i)
    if fmt == "messages":
        return {"messages": prompt + (chosen or [])}
    if fmt == "trl":
        if chosen is None:
            return {"messages": prompt}
        if as_strings:
            return {"prompt": _prompt_string(prompt), "chosen": _text(chosen), "rejected": _text(rejected or [])}
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    system, body = _split_system(prompt)
    if fmt == "sharegpt":
        conv = [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in body]
        out: dict[str, Any] = {"conversations": conv}
        if chosen is not None:
            out["chosen"] = {"from": "gpt", "value": _text(chosen)}
            out["rejected"] = {"from": "gpt", "value": _text(rejected or [])}
        if system:
            out["system"] = system
        return out
    if fmt == "alpaca":
        if chosen is None:
            last = max((k for k, m in enumerate(body) if m["role"] == "assistant"), default=len(body))
            hist, instr = _history(body[:last])
            out = {"instruction": instr, "input": "", "output": body[last]["content"] if last < len(body) else ""}
        else:
            hist, instr = _history(body)
            out = {"instruction": instr, "input": "", "chosen": _text(chosen), "rejected": _text(rejected or [])}
        if hist:
            out["history"] = hist
        if system:
            out["system"] = system
        return out
    raise param_error("export", "format", f"one of {list(FORMATS)}", fmt)


def export_records(table: pl.DataFrame, fmt: str, *, as_strings: bool = False) -> list[dict[str, Any]]:
    """Every row of ``table`` in format ``fmt``, in table order (``curry__*`` columns copied as ``curry_*``)."""
    if fmt not in FORMATS:
        raise param_error("export", "format", f"one of {list(FORMATS)}", fmt)
    extra = [c for c in table.columns if c.startswith("curry__")]
    out = []
    for i, row in enumerate(table.iter_rows(named=True)):
        rec = export_record(row, fmt, as_strings=as_strings, i=i)
        for c in extra:
            rec[c.replace("__", "_")] = row[c]
        out.append(rec)
    return out


def write_export(table: pl.DataFrame, path: str | Path, fmt: str, *, as_strings: bool = False) -> Path:
    """Write ``table`` in ``fmt`` to ``path`` (``.jsonl``, ``.json`` or ``.parquet``) atomically."""
    path = Path(path)
    recs = export_records(table, fmt, as_strings=as_strings)
    if path.suffix == ".parquet":
        return write_parquet(pl.DataFrame(recs) if recs else pl.DataFrame(), path)
    if path.suffix not in (".jsonl", ".json"):
        raise param_error("export", "output", "a path ending in .jsonl, .json or .parquet", str(path))
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        if path.suffix == ".json":
            json.dump(recs, fh, ensure_ascii=False, indent=1)
        else:
            for r in recs:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path




# ------------------------------------------------------------------------------------ the step
@register_step("export")
@dataclass(frozen=True, kw_only=True)
class Export:
    """Write the rows that reach this step in a trainer format to ``<step dir>/export.<format>.jsonl``
    (keeps every row; put it last). Formats: ``trl`` | ``sharegpt`` | ``alpaca`` | ``messages``.

    Args:
        format: the output format.
        as_strings: TRL standard (string) format instead of conversational messages.
        path: an explicit output path instead of the step folder.
    """

    format: str = "trl"
    as_strings: bool = False
    path_params: ClassVar[tuple[str, ...]] = ("path",)
    path: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise param_error("step 'export'", "format", f"one of {list(FORMATS)}", self.format)
        if not isinstance(self.as_strings, bool):
            raise param_error("step 'export'", "as_strings", "True or False", self.as_strings)
        if self.path is not None and (not isinstance(self.path, str) or
                                      Path(self.path).suffix not in (".jsonl", ".json", ".parquet")):
            raise param_error("step 'export'", "path", "a path ending in .jsonl, .json or .parquet, or null", self.path)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        bad = table.filter(~pl.col("kind").is_in(["sft", "preference"]))
        keep = table["kind"].is_in(["sft", "preference"])
        good = table.filter(keep)
        out = Path(self.path) if self.path else (ctx.step_dir or Path(".")) / f"export.{self.format}.jsonl"
        write_export(good, out, self.format, as_strings=self.as_strings)
        ctx.stats["export"] = {"path": str(out), "rows": good.height, "format": self.format,
                               "not_exportable": bad.height}
        return pl.DataFrame({"uid": table["uid"], "keep": keep,
                             "reason": ["" if k else "not_exportable_kind" for k in keep.to_list()]})


__all__ = ["FORMATS", "Export", "export_record", "export_records", "write_export"]
