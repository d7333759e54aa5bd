"""What became of each row: reason categories for funnels, the split of a finished table into
curated and rejected rows (with the step that dropped them), and the one writer of a run's
outputs (:func:`write_outcome`).

Every run folder, whether a recipe (``curate run``) or a verb (``curate dedup | select | ches ...``,
an in-memory recipe) made it, has the same outputs::

    curated.parquet     kept rows: the input columns plus every step's <step>__* columns
    rejected.parquet    dropped rows with ``step`` (the first step that dropped them) and ``reason``
    selection.parquet   the last selector step's own columns (uid, score, keep, rank, reason, ...)
    manifest.json       recipe, inputs, funnel, rows, selected uid hash, selection block

These live apart from the runner because the runner, the report and the CLI all group reasons
the same way; the report reads them from here instead of from the runner, which itself calls the
report at the end of a run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from curate.io.writers import write_json, write_parquet
from curate.schema import step_columns

#: The outputs :func:`write_outcome` writes, in the order it writes them (manifest last).
OUTCOME_FILES = ("curated.parquet", "rejected.parquet", "selection.parquet", "manifest.json")

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


def selection_frame(table: pl.DataFrame, step: str) -> pl.DataFrame:
    """The rows a selector step saw (its ``keep`` is set) with its columns, unprefixed."""
    prefix = f"{step}__"
    cols = [c for c in table.columns if c.startswith(prefix)]
    return table.filter(pl.col(f"{prefix}keep").is_not_null()).select(
        "uid", *[pl.col(c).alias(c[len(prefix):]) for c in cols])


def selected_uids_hash(uids: list[str]) -> str:
    """blake2b-128 of the sorted kept uids: the identity of a subset, whatever made it."""
    return hashlib.blake2b("\n".join(sorted(uids)).encode(), digest_size=16).hexdigest()


def write_outcome(run_dir: str | Path, table: pl.DataFrame, alive: pl.Series, ingest_rejects: pl.DataFrame,
                  manifest: dict[str, Any], *, selection_step: str | None = None,
                  steps: Sequence[Any] = ()) -> dict[str, Any]:
    """Write a run's outputs: the one writer of curated / rejected / selection / manifest.

    Args:
        table: every ingested row with the steps' ``<step>__*`` columns (rows never removed).
        alive: per row of ``table``, whether every step kept it.
        ingest_rejects: records that gave no row at ingest (they join ``rejected.parquet`` with
            step ``ingest``).
        manifest: the run's manifest; ``rows``, ``selected_uids_hash`` and ``outputs`` are filled in
            here, and it is written last, so a manifest always describes files that exist.
        selection_step: the selector step whose columns become ``selection.parquet`` (None: no
            selector ran, no selection file).
        steps: the run's step objects; one with a ``curated_output(curated)`` method (PII
            redaction) rewrites the curated rows on their way out, in step order.

    Returns:
        The manifest as written.
    """
    run_dir = Path(run_dir)
    curated = table.filter(alive)
    rejected = rejected_rows(table, alive, ingest_rejects)
    for step in steps:
        if hasattr(step, "curated_output"):
            curated = step.curated_output(curated)
    write_parquet(curated, run_dir / "curated.parquet")
    write_parquet(rejected, run_dir / "rejected.parquet")
    outputs = ["curated.parquet", "rejected.parquet"]
    if selection_step is not None:
        write_parquet(selection_frame(table, selection_step), run_dir / "selection.parquet")
        outputs.append("selection.parquet")
    else:
        (run_dir / "selection.parquet").unlink(missing_ok=True)  # a selection of an earlier recipe
    manifest = {**manifest, "rows": {"input": int(manifest.get("rows", {}).get("input", table.height)),
                                     "curated": curated.height, "rejected": rejected.height},
                "selected_uids_hash": selected_uids_hash(curated["uid"].to_list()),
                "outputs": [*outputs, "manifest.json"]}
    write_json(manifest, run_dir / "manifest.json")
    return manifest
