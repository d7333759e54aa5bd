"""Token counts with the model's own tokenizer: the ``count_tokens`` step.

A budget of "2 M training tokens" means tokens as the model sees them: the conversation rendered by
the tokenizer's chat template (system prompt, role markers and end-of-turn tokens included), then
encoded by the fast (Rust) tokenizer in batches. Per row:

- ``n_prompt_tokens`` = len(encode(template(prompt turns, add_generation_prompt=True)));
- ``n_tokens`` = len(encode(template(prompt turns + response turn)));
- ``n_response_tokens`` = ``n_tokens - n_prompt_tokens`` (the tokens a response-masked loss trains on;
  ChatML-style templates render the prompt as a prefix of the full conversation);
- preference rows: the response is ``chosen``; ``n_rejected_tokens`` counts ``rejected`` the same way.

Without a chat template (or ``chat_template: false``) the prompt and response texts are encoded
plainly and ``n_tokens`` is their sum. The default tokenizer is the packaged SmolLM2-135M-Instruct
one (see :func:`curate.features.lm.default_model_path`); ``tokenizer`` may name any local tokenizer
folder, or a Hub id already in the local Hugging Face cache (nothing is downloaded).

``tokens:`` budgets, the ``filter`` step's token bounds and the report read these columns
(``count_tokens__n_tokens`` in a run); without them a whitespace word count stands in and is marked
approximate.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.schema import split_prompt_response

COUNT_COLUMNS = ("n_tokens", "n_prompt_tokens", "n_response_tokens")
DEFAULT_TOKENIZER = "smollm2-135m-instruct"


def resolve_column(table: pl.DataFrame, name: str, *, owner: str = "budget") -> str:
    """The column ``name`` stands for: ``name`` itself, else the last ``<step>__<name>`` column (the
    latest step that wrote it, e.g. ``lang_id__language`` for ``language``).

    Raises:
        SchemaError: no such column; the message lists the candidates.
    """
    if name in table.columns:
        return name
    suffixed = [c for c in table.columns if c.endswith(f"__{name}")]
    if suffixed:
        return suffixed[-1]
    raise SchemaError(f"{owner}: the table has no column '{name}' (nor '<step>__{name}').", field=name,
                      expected="a column of the pool", found=sorted(table.columns)[:30])


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str | None = None) -> tuple[Any, str]:
    """(tokenizer, its name for manifests) for ``spec``: None or ``"default"`` -> the packaged
    SmolLM2 tokenizer; a folder -> the tokenizer saved there; anything else -> a Hub id read from the
    local cache only.

    Raises:
        ParameterError: ``spec`` is neither a tokenizer folder nor a cached Hub id.
    """
    tr = require("transformers", "counting tokens with the model's tokenizer")
    if spec is None or spec == "default":
        from curate.features.lm import default_model_path, quiet_transformers_bars

        folder = default_model_path()
        with quiet_transformers_bars():
            return tr.AutoTokenizer.from_pretrained(str(folder), local_files_only=True), DEFAULT_TOKENIZER
    path = Path(spec).expanduser()
    try:
        tok = tr.AutoTokenizer.from_pretrained(str(path) if path.exists() else spec, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise param_error("count_tokens", "tokenizer", "a local tokenizer folder (tokenizer.json inside), a Hub id in "
                          f"the local cache, or null for the packaged SmolLM2 tokenizer ({type(exc).__name__})",
                          spec) from None
    return tok, str(path) if path.exists() else spec


def _lengths(tok: Any, texts: Sequence[str]) -> np.ndarray:
    """Token counts of ``texts`` (no special tokens added: a chat template writes its own)."""
    if not texts:
        return np.zeros(0, dtype=np.int64)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return np.fromiter((len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)),
                           dtype=np.int64, count=len(texts))
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    return np.asarray([len(x) for x in ids], dtype=np.int64)


def _render(tok: Any, turns: list[list[dict[str, str]]], *, prompt: bool) -> list[str]:
    """Chat-template renderings of ``turns`` (one conversation each); an empty conversation is ""."""
    out = [""] * len(turns)
    idx = [i for i, t in enumerate(turns) if t]
    if not idx:
        return out
    convs = [[{"role": m["role"], "content": m["content"]} for m in turns[i]] for i in idx]
    try:
        rendered = tok.apply_chat_template(convs, tokenize=False, add_generation_prompt=prompt)
    except Exception:  # noqa: BLE001 - a template rejecting one row (e.g. a role it lacks): render one by one
        rendered = []
        for c in convs:
            try:
                rendered.append(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=prompt))
            except Exception:  # noqa: BLE001 - fall back to the plain text of that row
                rendered.append("\n".join(m["content"] for m in c))
    for i, r in zip(idx, rendered):
        out[i] = r
    return out


def count_table(table: pl.DataFrame, tokenizer: str | None = None, *, chat_template: bool = True,
                batch_size: int = 2048) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Count tokens of every row of a canonical ``table``.

    Returns ``(frame, info)``: ``frame`` has ``uid`` and :data:`COUNT_COLUMNS` (plus
    ``n_rejected_tokens`` when the table holds preference rows); ``info`` names the tokenizer and
    sums the counts.
    """
    tok, name = load_tokenizer(tokenizer)
    templated = bool(chat_template and getattr(tok, "chat_template", None))
    cols = [c for c in ("kind", "messages", "prompt", "chosen", "rejected", "answer") if c in table.columns]
    rows = table.select(cols).to_dicts()
    heads, tails, rejs = [], [], []
    for row in rows:
        row.setdefault("answer", None)
        head, tail = split_prompt_response(row)
        heads.append(head)
        tails.append(tail)
        rejs.append(list(row.get("rejected") or []) if row["kind"] == "preference" else [])
    has_pref = any(rejs)
    n_full = np.zeros(len(rows), dtype=np.int64)
    n_prompt = np.zeros(len(rows), dtype=np.int64)
    n_rej = np.zeros(len(rows), dtype=np.int64)
    for a in range(0, len(rows), batch_size):
        sl = slice(a, a + batch_size)
        h, t, r = heads[sl], tails[sl], rejs[sl]
        if templated:
            p_text = _render(tok, h, prompt=True)
            n_prompt[sl] = _lengths(tok, p_text)
            n_full[sl] = _lengths(tok, _render(tok, [x + y for x, y in zip(h, t)], prompt=False))
            if has_pref:
                n_rej[sl] = _lengths(tok, _render(tok, [x + y if y else [] for x, y in zip(h, r)], prompt=False))
                n_rej[sl] = np.where([bool(y) for y in r], n_rej[sl] - n_prompt[sl], 0)
        else:
            def plain(conv: list[list[dict[str, str]]]) -> list[str]:
                return ["\n".join(m["content"] for m in c) for c in conv]

            n_prompt[sl] = _lengths(tok, plain(h))
            n_full[sl] = n_prompt[sl] + _lengths(tok, plain(t))
            if has_pref:
                n_rej[sl] = _lengths(tok, plain(r))
    n_resp = np.maximum(n_full - n_prompt, 0)
    data: dict[str, Any] = {"uid": table["uid"], "n_tokens": n_full, "n_prompt_tokens": n_prompt,
                            "n_response_tokens": n_resp}
    if has_pref:
        data["n_rejected_tokens"] = np.maximum(n_rej, 0)
    info = {"tokenizer": name, "chat_template": templated, "rows": len(rows), "tokens": int(n_full.sum()),
            "prompt_tokens": int(n_prompt.sum()), "response_tokens": int(n_resp.sum())}
    return pl.DataFrame(data), info


@register_step("count_tokens")
@dataclass(frozen=True, kw_only=True)
class CountTokens:
    """Count tokens with the model's own tokenizer into ``n_tokens``, ``n_prompt_tokens`` and
    ``n_response_tokens`` (drops nothing).

    Parameters:
        tokenizer: a local tokenizer folder or a cached Hub id; null (default) = the packaged
            SmolLM2-135M-Instruct tokenizer.
        chat_template: render chat rows with the tokenizer's chat template first (default true).
        batch_size: rows per encode batch (does not change the counts).
    """

    path_or_name_params: ClassVar[tuple[str, ...]] = ("tokenizer",)
    tokenizer: str | None = None
    chat_template: bool = True
    batch_size: int = 2048

    def __post_init__(self) -> None:
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise param_error("count_tokens", "tokenizer", "a tokenizer folder, a cached Hub id or null", self.tokenizer)
        if not isinstance(self.chat_template, bool):
            raise param_error("count_tokens", "chat_template", "true or false", self.chat_template)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise param_error("count_tokens", "batch_size", "an integer >= 1", self.batch_size)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        counts, info = count_table(table, self.tokenizer, chat_template=self.chat_template,
                                   batch_size=self.batch_size)
        ctx.stats["tokens"] = info
        return counts.with_columns(pl.lit(True).alias("keep"), pl.lit("").alias("reason"))
