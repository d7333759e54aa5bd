"""Exact deduplication at three levels: prompt, response, or the whole pair / conversation.

Method: hash a normalised text key per row and keep one row per key, as in the exact-substring
stage of common web-text pipelines (e.g. Lee et al., 2022, "Deduplicating Training Data Makes
Language Models Better", whose exact stage works on whole documents). We deviate by deduplicating
whole rows on a chosen *field* (prompt, response or pair) instead of substrings, because
instruction rows are short and a row is the unit we keep or drop.

Keep rule (deterministic, row-order invariant): among rows with the same key the kept row is the
earliest by ``(source, source_line)`` and then the smallest ``uid``
(:func:`curate.curation._common.keep_order`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl

from curate.curation._common import cluster_frame, keep_order, normalise_text, write_artifact
from curate.errors import param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.schema import texts

EXACT_LEVELS = ("prompt", "response", "pair")


def _pair_texts(table: pl.DataFrame) -> list[str]:
    """Whole-row text: sft conversation with roles; preference prompt + chosen + rejected."""
    conv = texts(table, "conversation")
    rej = texts(table, "rejected")
    kinds = table["kind"].to_list()
    return [c + ("\n\n[rejected]\n\n" + r if k == "preference" else "") for c, r, k in zip(conv, rej, kinds)]


def exact_keys(table: pl.DataFrame, level: str = "pair", *, lowercase: bool = False, collapse_whitespace: bool = True) -> list[str]:
    """The dedup key (a 128-bit blake2b hex digest of the normalised text) of every row."""
    if level not in EXACT_LEVELS:
        raise param_error("exact_dedup", "level", f"one of {EXACT_LEVELS}", level)
    raw = _pair_texts(table) if level == "pair" else texts(table, level)
    return [
        hashlib.blake2b(
            normalise_text(t, lowercase=lowercase, collapse_whitespace=collapse_whitespace).encode("utf-8"), digest_size=16
        ).hexdigest()
        for t in raw
    ]


def exact_duplicates(
    table: pl.DataFrame, level: str = "pair", *, lowercase: bool = False, collapse_whitespace: bool = True
) -> pl.DataFrame:
    """Flag exact duplicates of ``level`` text.

    Args:
        table: canonical table.
        level: ``prompt``, ``response`` or ``pair`` (whole conversation / prompt+chosen+rejected).
        lowercase: compare case-folded text.
        collapse_whitespace: collapse whitespace runs and strip ends before comparing.

    Returns:
        One row per input row: ``uid, keep, reason, score, cluster_id, dup_of, cluster_size``;
        a dropped row's reason names the kept uid (``dup_of``). ``score`` is the similarity to the
        kept representative: always 1.0 here (the representative itself included).
    """
    keys = exact_keys(table, level, lowercase=lowercase, collapse_whitespace=collapse_whitespace)
    n = table.height
    if n == 0:
        return cluster_frame(table, np.empty(0, dtype=np.int64), np.empty(0), "exact_dedup", f"exact {level} duplicate")
    rank = keep_order(table)
    best: dict[str, int] = {}
    for i, k in enumerate(keys):
        j = best.get(k)
        if j is None or rank[i] < rank[j]:
            best[k] = i
    rep = np.fromiter((best[k] for k in keys), dtype=np.int64, count=n)
    sim = np.ones(n, dtype=np.float64)
    return cluster_frame(table, rep, sim, "exact_dedup", f"exact {level} duplicate")


@register_step("exact_dedup")
@dataclass(frozen=True, kw_only=True)
class ExactDedup:
    """Drop exact duplicates of the prompt, the response or the whole pair/conversation.

    Parameters:
        level: ``prompt`` | ``response`` | ``pair`` (default ``pair``).
        lowercase: compare case-folded text (default False).
        collapse_whitespace: collapse whitespace runs before comparing (default True).
    """

    level: str = "pair"
    lowercase: bool = False
    collapse_whitespace: bool = True

    def __post_init__(self) -> None:
        if self.level not in EXACT_LEVELS:
            raise param_error("ExactDedup", "level", f"one of {EXACT_LEVELS}", self.level)
        for name in ("lowercase", "collapse_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise param_error("ExactDedup", name, "a boolean", getattr(self, name))

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        out = exact_duplicates(table, self.level, lowercase=self.lowercase, collapse_whitespace=self.collapse_whitespace)
        dups = out.filter(~pl.col("keep"))
        ctx.stats["exact_dedup"] = {"level": self.level, "n_duplicates": dups.height,
                                    "n_groups": int(out.filter(pl.col("cluster_size") > 1)["cluster_id"].n_unique())}
        write_artifact(out.filter(pl.col("cluster_size") > 1).select(
            "uid", "cluster_id", "keep", "score", "cluster_size"), ctx.step_dir, "clusters.parquet")
        return out
