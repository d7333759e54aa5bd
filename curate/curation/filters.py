"""Heuristic quality filters for instruction and preference data, one named reason per rule.

Method: rule-based quality filters in the spirit of Gopher (Rae et al., 2021, "Scaling Language
Models", appendix A: length bounds, repeated n-gram fractions, alphabetic-character ratios) and
the instruction-data cleaning of AlpacaDataCleaned / Dolly (refusal and "As an AI language model"
boilerplate). We deviate by applying the rules per *turn* (prompt and response separately) with
thresholds loosened for short chat rows, and by adding pair rules (identical chosen and rejected)
and truncation checks (unbalanced code fences; a response at the generation limit that ends
mid-sentence).

Every rule is a parameter; ``None`` disables it. A row is dropped by the first failing rule in
the order of :data:`RULES`; the reason starts with the rule name.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import polars as pl

from curate.curation._common import word_tokens
from curate.errors import SchemaError, param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext, step_params
from curate.schema import texts

RULES = ("empty_turn", "identical_pair", "too_short", "too_long", "too_few_tokens", "too_many_tokens",
         "length_ratio", "unbalanced_fence", "truncated", "refusal", "repetition", "non_language")

DEFAULT_REFUSALS = (
    "as an ai language model", "as a language model", "as an ai assistant, i", "i'm sorry, but i cannot",
    "i am sorry, but i cannot", "i'm sorry, but i can't", "i cannot fulfill", "i can't fulfill",
    "i'm not able to provide", "i am not able to provide", "my knowledge cutoff",
    "i do not have personal opinions", "i don't have personal opinions",
)
_END_RE = re.compile(r"[.!?…。！？:;)\]}\"'`*_~>|]\s*$|```\s*$")


def _ratio_of_dup_ngrams(tokens: list[str], n: int) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram (Gopher's duplicate n-gram fraction,
    counted in n-grams instead of characters)."""
    if len(tokens) < n + 1:
        return 0.0
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return (total - len(grams)) / total


def _letter_ratio(text: str) -> float:
    """Letters (any script) over non-whitespace characters."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 1.0


@register_step("filter")
@dataclass(frozen=True, kw_only=True)
class HeuristicFilter:
    """Heuristic filters with named reasons (documented defaults; ``None`` disables a rule).

    Parameters:
        min_prompt_chars: prompt shorter than this is ``too_short`` (default 3).
        min_response_chars: response shorter than this is ``too_short`` (default 1).
        max_chars: prompt+response longer than this is ``too_long`` (default 100000).
        min_tokens / max_tokens: bounds on the row's token count (prompt + response after the chat
            template; ``too_few_tokens`` / ``too_many_tokens``).
        min_response_tokens / max_response_tokens: bounds on the response's token count.
        tokenizer: where token counts come from when the table has no counted columns (the
            ``count_tokens`` step's ``n_tokens`` / ``n_response_tokens``, which win): a tokenizer folder,
            a cached Hub id or ``default`` (the packaged SmolLM2 tokenizer). A token bound with neither
            is an error when the step runs.
        min_length_ratio / max_length_ratio: bounds on response chars / prompt chars (default off).
        check_fences: odd number of ``` fences in the response is ``unbalanced_fence`` (default True).
        truncation_chars: a response at least this long that ends mid-sentence is ``truncated``
            (set it to the generation limit; default off).
        refusal_phrases: case-insensitive phrases marking refusals/boilerplate (default list; [] = off).
        repeat_ngram / max_repeat_ratio: word n-gram size and the largest allowed fraction of repeated
            n-grams in the response (default 3 and 0.5; responses under 30 words are exempt).
        min_letter_ratio: smallest share of letters among non-space characters of the response
            (default 0.25; responses under 20 characters are exempt).
        identical_pair: drop preference pairs whose chosen equals rejected (default True).
        shard_size: rows per executor shard when run as a step (does not change results).
    """

    min_prompt_chars: int | None = 3
    min_response_chars: int | None = 1
    max_chars: int | None = 100_000
    path_or_name_params: ClassVar[tuple[str, ...]] = ("tokenizer",)
    tokenizer: str | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    min_response_tokens: int | None = None
    max_response_tokens: int | None = None
    min_length_ratio: float | None = None
    max_length_ratio: float | None = None
    check_fences: bool = True
    truncation_chars: int | None = None
    refusal_phrases: tuple[str, ...] | list[str] = DEFAULT_REFUSALS
    repeat_ngram: int = 3
    max_repeat_ratio: float | None = 0.5
    min_letter_ratio: float | None = 0.25
    identical_pair: bool = True
    shard_size: int = 20_000

    def __post_init__(self) -> None:
        owner = "HeuristicFilter"
        if isinstance(self.shard_size, bool) or not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise param_error(owner, "shard_size", "an integer >= 1", self.shard_size)
        for name in ("min_prompt_chars", "min_response_chars", "max_chars", *_TOKEN_BOUNDS, "truncation_chars"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise param_error(owner, name, "an integer >= 0 or null", v)
        for name in ("min_length_ratio", "max_length_ratio"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise param_error(owner, name, "a number >= 0 or null", v)
        for name in ("max_repeat_ratio", "min_letter_ratio"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0):
                raise param_error(owner, name, "in [0, 1] or null", v)
        if isinstance(self.repeat_ngram, bool) or not isinstance(self.repeat_ngram, int) or self.repeat_ngram < 1:
            raise param_error(owner, "repeat_ngram", "an integer >= 1", self.repeat_ngram)
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer.strip()):
            raise param_error(owner, "tokenizer", "a tokenizer folder, a cached Hub id, 'default' or null", self.tokenizer)
        phrases = [self.refusal_phrases] if isinstance(self.refusal_phrases, str) else list(self.refusal_phrases)
        if any(not isinstance(p, str) or not p.strip() for p in phrases):
            raise param_error(owner, "refusal_phrases", "a list of non-empty strings", self.refusal_phrases)
        object.__setattr__(self, "refusal_phrases", tuple(p.lower() for p in phrases))

    def bounds_tokens(self) -> bool:
        """Whether any token bound is set (the step then needs counts)."""
        return any(getattr(self, b) is not None for b in _TOKEN_BOUNDS)

    def check(self, prompt: str, response: str, turns: list[str], chosen: str | None, rejected: str | None,
              n_tokens: int | None, n_response_tokens: int | None = None) -> str:
        """The first failing rule's reason for one row, or "" if it passes."""
        if any(not t.strip() for t in turns):
            return "empty_turn: a turn is empty or whitespace-only"
        if self.identical_pair and chosen is not None and chosen.strip() == (rejected or "").strip():
            return "identical_pair: chosen and rejected are identical"
        if self.min_prompt_chars is not None and len(prompt.strip()) < self.min_prompt_chars:
            return f"too_short: prompt has {len(prompt.strip())} chars (< {self.min_prompt_chars})"
        if self.min_response_chars is not None and len(response.strip()) < self.min_response_chars:
            return f"too_short: response has {len(response.strip())} chars (< {self.min_response_chars})"
        if self.max_chars is not None and len(prompt) + len(response) > self.max_chars:
            return f"too_long: {len(prompt) + len(response)} chars (> {self.max_chars})"
        for what, count, lo, hi in (("row", n_tokens, self.min_tokens, self.max_tokens),
                                     ("response", n_response_tokens, self.min_response_tokens, self.max_response_tokens)):
            if count is not None and lo is not None and count < lo:
                return f"too_few_tokens: {what} has {count} tokens (< {lo})"
            if count is not None and hi is not None and count > hi:
                return f"too_many_tokens: {what} has {count} tokens (> {hi})"
        if prompt.strip() and (self.min_length_ratio is not None or self.max_length_ratio is not None):
            ratio = len(response) / len(prompt)
            if self.min_length_ratio is not None and ratio < self.min_length_ratio:
                return f"length_ratio: response/prompt {ratio:.3f} (< {self.min_length_ratio})"
            if self.max_length_ratio is not None and ratio > self.max_length_ratio:
                return f"length_ratio: response/prompt {ratio:.3f} (> {self.max_length_ratio})"
        if self.check_fences and response.count("```") % 2 == 1:
            return "unbalanced_fence: odd number of ``` fences in the response"
        if (self.truncation_chars is not None and len(response) >= self.truncation_chars
                and not _END_RE.search(response)):
            return f"truncated: response reaches {len(response)} chars and ends mid-sentence"
        low = response.lower()
        for phrase in self.refusal_phrases:
            if phrase in low:
                return f"refusal: response contains \"{phrase}\""
        if self.max_repeat_ratio is not None:
            toks = word_tokens(response)
            if len(toks) >= 30:
                r = _ratio_of_dup_ngrams(toks, self.repeat_ngram)
                if r > self.max_repeat_ratio:
                    return f"repetition: {r:.3f} of response {self.repeat_ngram}-grams repeat (> {self.max_repeat_ratio})"
        if self.min_letter_ratio is not None and len(response.strip()) >= 20:
            r = _letter_ratio(response)
            if r < self.min_letter_ratio:
                return f"non_language: letters are {r:.3f} of response characters (< {self.min_letter_ratio})"
        return ""

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        """Filter ``table`` shard by shard through ``ctx.map_shards`` (local or Ray; per-row rules, so
        any sharding gives the same rows)."""
        params = {"work": "filter", "v": 1, **{k: v for k, v in step_params(self).items() if k != "shard_size"}}
        if self.bounds_tokens():  # counts travel with the shards: the counted columns, else the tokenizer's
            table = with_token_counts(table, self)
            params["counts"] = "columns"
        parts = ctx.map_shards(filter_shard, table, params=params, shard_size=self.shard_size,
                               payload=functools.partial(_filter_payload, rules=self), desc="filter")
        if not parts:
            return filter_table(table, self)
        return pl.concat(parts, how="vertical")


_FILTER_COLUMNS = ("uid", "kind", "messages", "prompt", "chosen", "rejected")
_TOKEN_BOUNDS = ("min_tokens", "max_tokens", "min_response_tokens", "max_response_tokens")
_COUNTS = ("__filter_n_tokens", "__filter_n_response_tokens")


def with_token_counts(table: pl.DataFrame, rules: HeuristicFilter) -> pl.DataFrame:
    """``table`` plus the token counts the bounds read (columns :data:`_COUNTS`): the counted
    columns of a ``count_tokens`` step when present, else counts made with ``rules.tokenizer``.

    Raises:
        ParameterError: token bounds are set, the table has no counts and no tokenizer is given.
    """
    if all(c in table.columns for c in _COUNTS):
        return table
    from curate.curation.tokens import resolve_column

    found = {}
    for name in ("n_tokens", "n_response_tokens"):
        with contextlib.suppress(SchemaError):
            found[name] = resolve_column(table, name)
    if len(found) < 2:
        if not rules.tokenizer:
            raise param_error("HeuristicFilter", "tokenizer", "given ('default' = the packaged SmolLM2 tokenizer) "
                              "when token bounds are set and no count_tokens step ran before the filter", None)
        from curate.curation.tokens import count_table

        counts, _ = count_table(table, None if rules.tokenizer == "default" else rules.tokenizer)
        table = table.join(counts.select("uid", "n_tokens", "n_response_tokens").rename(
            {"n_tokens": _COUNTS[0], "n_response_tokens": _COUNTS[1]}), on="uid", how="left", maintain_order="left")
        return table
    return table.with_columns(pl.col(found["n_tokens"]).alias(_COUNTS[0]),
                              pl.col(found["n_response_tokens"]).alias(_COUNTS[1]))


def _filter_payload(shard: pl.DataFrame, *, rules: HeuristicFilter) -> tuple[pl.DataFrame, HeuristicFilter]:
    return shard.select([c for c in (*_FILTER_COLUMNS, *_COUNTS) if c in shard.columns]), rules


def filter_shard(payload: tuple[pl.DataFrame, HeuristicFilter]) -> pl.DataFrame:
    """The sharded work of the filter step: :func:`filter_table` on one shard (importable, so Ray
    workers can run it)."""
    shard, rules = payload
    return filter_table(shard, rules)


def filter_table(table: pl.DataFrame, rules: HeuristicFilter | None = None, **params: Any) -> pl.DataFrame:
    """Run the heuristic filters on ``table`` (``rules`` or ``HeuristicFilter(**params)``).

    Returns ``uid, keep, reason, rule`` (``rule`` = the failing rule's name or null).
    """
    rules = rules or HeuristicFilter(**params)
    prompts, responses = texts(table, "prompt"), texts(table, "response")
    rejected = texts(table, "rejected")
    if rules.bounds_tokens():
        table = with_token_counts(table, rules)
        n_tokens = table[_COUNTS[0]].to_list()
        n_resp = table[_COUNTS[1]].to_list()
    else:
        n_tokens = n_resp = [None] * table.height
    reasons = []
    cols = table.select("kind", "messages", "prompt", "chosen", "rejected").iter_rows(named=True)
    for i, row in enumerate(cols):
        if row["kind"] == "preference":
            turns = [m["content"] for m in (row["prompt"] or []) + (row["chosen"] or []) + (row["rejected"] or [])]
            chosen, rej = responses[i], rejected[i]
        else:
            turns = [m["content"] for m in row["messages"] or []]
            chosen = rej = None
        reasons.append(rules.check(prompts[i], responses[i], turns, chosen, rej, n_tokens[i], n_resp[i]))
    return pl.DataFrame({
        "uid": table["uid"], "keep": [r == "" for r in reasons], "reason": reasons,
        "rule": [r.split(":", 1)[0] if r else None for r in reasons],
    }, schema_overrides={"rule": pl.Utf8})
