"""What became of each row: reason categories for funnels and the split of a finished table into
rejected rows with the step that dropped them.

These live apart from the runner because the runner, the report and the CLI all group reasons
the same way; the report reads them from here instead of from the runner, which itself calls the
report at the end of a run.
"""

from __future__ import annotations

import re

import polars as pl

from curate.schema import step_columns

_UID_RE = re.compile(r"\b[0-9a-f]{32}\b")
_NUM_RE = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def reason_category(reason: str) -> str:
    """Group reasons for funnels: uids become <uid>, numbers become #."""
    return _NUM_RE.sub("#", _UID_RE.sub("<uid>", reason))


def count_reasons(reasons: list[str]) -> dict[str, int]:
    """Reason category -> rows, largest first (ties by category)."""
    counts: dict[str, int] = {}
    for r in reasons:
        c = reason_category(r or "")
        counts[c] = counts.get(c, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def rejected_rows(table: pl.DataFrame, alive: pl.Series, ingest_rejects: pl.DataFrame) -> pl.DataFrame:
    """Dropped rows with ``step`` (the first step that dropped them) and its ``reason``."""
    dropped = table.filter(~alive)
    steps = step_columns(table)
    if steps and dropped.height:
        step_expr = pl.lit(None, dtype=pl.Utf8)
        reason_expr = pl.lit(None, dtype=pl.Utf8)
        for s in reversed(steps):  # the first dropping step wins
            hit = pl.col(f"{s}__keep").is_not_null() & ~pl.col(f"{s}__keep")
            step_expr = pl.when(hit).then(pl.lit(s)).otherwise(step_expr)
            reason_expr = pl.when(hit).then(pl.col(f"{s}__reason")).otherwise(reason_expr)
        dropped = dropped.with_columns(step_expr.alias("step"), reason_expr.alias("reason"))
    else:
        dropped = dropped.with_columns(pl.lit(None, dtype=pl.Utf8).alias("step"), pl.lit(None, dtype=pl.Utf8).alias("reason"))
    if ingest_rejects.height:
        ing = ingest_rejects.with_columns(pl.lit("ingest").alias("step"))
        return pl.concat([dropped, ing], how="diagonal_relaxed")
    return dropped
