"""Curry-DPO curricula: pairs from several rated responses per prompt, ordered easy to hard.

Pattnaik et al., "Curry-DPO: Enhancing Alignment using Curriculum Learning & Ranked Preferences"
(arXiv 2403.07230); docs/methods/preference-diagnostics.md §3.

- Pairing ``best_vs_rest`` (default): chosen = the top-rated response, rejected = each lower-rated one;
  ``all``: every ordered pair whose ratings differ (tied ratings are skipped).
- Gap g = rating(chosen) − rating(rejected) (higher rating = better; ranks, where 0 is best, are negated).
- Per prompt, pairs sorted by (−g, rejected id); stage s holds each prompt's s-th pair; the global order is
  (stage, −g, prompt id). Curry-DPO trains stage by stage with the previous stage's policy as reference
  (recalled; unverified) — we only produce the order and stages.

For an existing pair table (``order_curriculum``) the key is either a gap column or the reference margin
(larger = easier); ``buckets`` replaces per-prompt stages with N equal-count buckets of that key.
Ties go to the smaller uid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.errors import SchemaError, param_error
from curate.schema import dedupe_uids, make_record, to_frame

PAIRINGS = ("best_vs_rest", "all")
ORDER_BY = ("gap", "margin")


@dataclass
class RatedPrompt:
    """One prompt with several rated responses (higher rating = better)."""

    prompt: list[dict[str, str]]
    responses: list[str]
    ratings: list[float]
    prompt_id: str = ""
    response_ids: list[str] | None = None


def curry_pairs(groups: Sequence[RatedPrompt], *, pairing: str = "best_vs_rest") -> pl.DataFrame:
    """Canonical preference table with ``curry__gap``, ``curry__stage`` (1-based), ``curry__order`` (1-based)."""
    if pairing not in PAIRINGS:
        raise param_error("curry_pairs", "pairing", f"one of {list(PAIRINGS)}", pairing)
    rows: list[tuple[dict[str, Any], float, str, str]] = []  # record, gap, prompt id, rejected id
    for gi, g in enumerate(groups):
        if len(g.responses) != len(g.ratings):
            raise SchemaError("responses and ratings differ in length.", line=gi + 1, field="ratings",
                              expected=f"{len(g.responses)} ratings", found=len(g.ratings))
        rids = g.response_ids or [f"{i:06d}" for i in range(len(g.responses))]
        pid = g.prompt_id or f"{gi:08d}"
        idx = sorted(range(len(g.responses)), key=lambda i: (-g.ratings[i], rids[i]))
        if pairing == "best_vs_rest":
            best = idx[0]
            cands = [(best, j) for j in idx[1:] if g.ratings[j] < g.ratings[best]]
        else:
            cands = [(i, j) for i in idx for j in idx if g.ratings[i] > g.ratings[j]]
        mine = []
        for i, j in cands:
            rec = make_record("preference", prompt=g.prompt, chosen=[{"role": "assistant", "content": g.responses[i]}],
                              rejected=[{"role": "assistant", "content": g.responses[j]}], label_source="ratings",
                              meta={"prompt_id": pid, "chosen_id": rids[i], "rejected_id": rids[j],
                                    "chosen_rating": g.ratings[i], "rejected_rating": g.ratings[j]})
            mine.append((rec, float(g.ratings[i] - g.ratings[j]), pid, rids[j]))
        mine.sort(key=lambda t: (-t[1], t[3]))
        rows += [(r, gap, p, f"{s:06d}") for s, (r, gap, p, _) in enumerate(mine, start=1)]
    recs = [r for r, *_ in rows]
    dedupe_uids(recs)
    table = to_frame(recs)
    gaps = [g for _, g, _, _ in rows]
    stages = [int(s) for *_, s in rows]
    pids = [p for _, _, p, _ in rows]
    table = table.with_columns(pl.Series("curry__gap", gaps, dtype=pl.Float64),
                               pl.Series("curry__stage", stages, dtype=pl.Int64))
    order = sorted(range(len(rows)), key=lambda i: (stages[i], -gaps[i], pids[i], recs[i]["uid"]))
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = np.arange(1, len(rows) + 1)
    return table.with_columns(pl.Series("curry__order", rank)).sort("curry__order")


def oasst_groups(path: str | Path) -> list[RatedPrompt]:
    """Rated groups from OpenAssistant message trees (JSONL): every prompter node with >= 2 ranked
    assistant replies gives one group; rating = −rank (rank 0 is best); the prompt is the path so far."""
    groups: list[RatedPrompt] = []

    def walk(node: Mapping[str, Any], history: list[dict[str, str]]) -> None:
        role = "user" if node.get("role") == "prompter" else "assistant"
        hist = history + [{"role": role, "content": node.get("text", "")}]
        replies = [r for r in node.get("replies") or [] if not r.get("deleted")]
        ranked = [r for r in replies if isinstance(r.get("rank"), int)]
        if role == "user" and len(ranked) >= 2:
            groups.append(RatedPrompt(hist, [r["text"] for r in ranked], [-float(r["rank"]) for r in ranked],
                                      prompt_id=str(node.get("message_id")),
                                      response_ids=[str(r.get("message_id")) for r in ranked]))
        for r in replies:
            walk(r, hist)

    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                walk(json.loads(line)["prompt"], [])
    return groups


def order_curriculum(table: pl.DataFrame, *, by: str = "gap", buckets: int | None = None,
                     column: str | None = None) -> pl.DataFrame:
    """Order a pair table easy → hard and add ``curry__key``, ``curry__stage``, ``curry__order``.

    Args:
        by: ``gap`` (column ``curry__gap``, or ``column``) or ``margin`` (the reference margin: a
            ``diagnose__score``/``diagnose__margin``/``margin`` column, or ``column``). Larger = easier.
        buckets: N equal-count buckets of the key (stage 1 = easiest); None keeps ``curry__stage`` when the
            table has it (per-prompt stages), else one stage.
        column: explicit key column.
    """
    if by not in ORDER_BY:
        raise param_error("order_curriculum", "by", f"one of {list(ORDER_BY)}", by)
    if buckets is not None and (isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1):
        raise param_error("order_curriculum", "buckets", "an integer >= 1 or None", buckets)
    cands = [column] if column else (["curry__gap", "gap"] if by == "gap" else
                                     ["diagnose__margin", "diagnose__score", "margin", "refmargin__margin"])
    col = next((c for c in cands if c in table.columns), None)
    if col is None:
        raise SchemaError(f"no column to order by {by}.", field=cands[0], expected=f"one of {cands}",
                          found=f"columns {table.columns[:12]}")
    key = table[col].cast(pl.Float64).to_numpy()
    if np.isnan(key).any():
        i = int(np.argmax(np.isnan(key)))
        raise SchemaError(f"the {by} column has missing values.", line=i + 1, field=col, expected="a number",
                          found=f"null (uid {table['uid'][i]})")
    uids = np.asarray(table["uid"].to_list(), dtype=str)
    if buckets is not None:
        easy = np.lexsort((uids, -key))
        stage = np.empty(len(key), dtype=np.int64)
        stage[easy] = np.arange(len(key)) * buckets // max(len(key), 1) + 1
    elif "curry__stage" in table.columns and col == "curry__gap":
        stage = table["curry__stage"].to_numpy().astype(np.int64)
    else:
        stage = np.ones(len(key), dtype=np.int64)
    pid = np.asarray([_prompt_id(m) for m in (table["meta"].to_list() if "meta" in table.columns
                                              else [None] * len(key))], dtype=str)
    order = np.lexsort((uids, pid, -key, stage))
    rank = np.empty(len(key), dtype=np.int64)
    rank[order] = np.arange(1, len(key) + 1)
    out = table.with_columns(pl.Series("curry__key", key), pl.Series("curry__stage", stage),
                             pl.Series("curry__order", rank))
    return out.sort("curry__order")


def _prompt_id(meta: Any) -> str:
    if not meta:
        return ""
    try:
        return str(json.loads(meta).get("prompt_id", ""))
    except (ValueError, AttributeError):
        return ""


def n_stages(table: pl.DataFrame) -> int:
    return int(table["curry__stage"].max()) if table.height else 0


__all__ = ["PAIRINGS", "RatedPrompt", "curry_pairs", "n_stages", "oasst_groups", "order_curriculum"]

