"""CLI verbs of preference curation: ``curate ches | diagnose | curriculum | export``.

- ``ches`` is the in-memory recipe ``ches_states`` → ``ches`` (:mod:`curate.pipeline.verbs`): the run
  folder of ``curate run`` with ``curated.parquet``, ``rejected.parquet`` (with ``step``/``reason``), ``selection.parquet``
  (every pair: uid, score, ches__ches, ches__ln_ches, ches__len_chosen, ches__len_rejected, keep, rank,
  reason) and ``manifest.json``. Rows that are not preference pairs exit 2 naming the row; pairs with an
  empty response go to rejected with ``no_response_tokens``.
- ``diagnose`` writes ``diagnostics.parquet`` (the table plus ``diagnose__*`` columns) and ``summary.json``.
- ``curriculum`` writes the pairs ordered easy → hard with ``curry__*`` columns.
- ``export`` writes trainer formats (see :mod:`curate.preference.export`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import polars as pl

from curate.cli._common import emit as _emit
from curate.cli._common import read_table as _read
from curate.errors import SchemaError


def _require_pairs(table: pl.DataFrame, path: str) -> None:
    bad = table.with_row_index("_i").filter(pl.col("kind") != "preference")
    if bad.height:
        raise SchemaError(f"{bad.height} row(s) are not preference pairs (CHES and diagnostics need pairs).",
                          file=path, line=int(bad["_i"][0]) + 1, field="kind", expected="kind 'preference'",
                          found=f"{bad['kind'][0]!r} (uid {bad['uid'][0]})")


@click.command()
@click.argument("input_path", metavar="IN")
@click.option("-o", "--output", required=True, help="Output folder.")
@click.option("--model", default="default", show_default=True, help="Causal LM: 'default' or a local folder.")
@click.option("--keep-bottom", type=float, default=None, help="Keep the lowest fraction (paper: 0.05).")
@click.option("--drop-top", type=float, default=None, help="Drop the highest fraction.")
@click.option("--threshold", type=float, default=None, help="Keep pairs whose measure is <= X.")
@click.option("--length-normalize/--no-length-normalize", default=True, show_default=True,
              help="Filter on LN-CHES (default) or raw CHES.")
@click.option("--max-length", type=int, default=1024, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def ches(input_path: str, output: str, model: str, keep_bottom: float | None, drop_top: float | None,
         threshold: float | None, length_normalize: bool, max_length: int, batch_size: int, device: str,
         as_json: bool) -> None:
    """Filter preference pairs of IN by CHES / LN-CHES (Razin et al., ICLR 2025) into OUT_DIR."""
    from curate.pipeline.verbs import run_verb

    table = _read(input_path)
    _require_pairs(table, input_path)
    measure = "ln_ches" if length_normalize else "ches"
    steps = [{"use": "ches_states", "model": model, "max_length": max_length, "batch_size": batch_size,
              "device": device},
             {"use": "ches", "measure": measure, "keep_bottom_fraction": keep_bottom, "drop_top_fraction": drop_top,
              "threshold": threshold}]
    manifest = run_verb("ches", input_path, steps, output).manifest
    rows, params = manifest["rows"], manifest["selection"]["params"]
    mode = next((f"{k}={params[k]}" for k in ("keep_bottom_fraction", "drop_top_fraction", "threshold")
                 if params.get(k) is not None), "keep all")
    _emit(as_json, manifest, [f"{rows['input']} pairs -> {rows['curated']} curated, {rows['rejected']} rejected "
                              f"({measure}, {mode})", f"outputs in {output}"])


@click.command()
@click.argument("input_path", metavar="IN")
@click.option("-o", "--output", required=True, help="Output folder.")
@click.option("--model", default="default", show_default=True, help="Reference model: 'default' or a folder.")
@click.option("--scorer", "scorers", multiple=True, help="Reward model / causal-LM judge folder (repeatable).")
@click.option("--max-length", type=int, default=1024, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def diagnose(input_path: str, output: str, model: str, scorers: tuple[str, ...], max_length: int, batch_size: int,
             device: str, as_json: bool) -> None:
    """Diagnose preference pairs of IN: reference margin, ranking accuracy, length bias, agreement, RM votes."""
    from curate.io.store import FeatureStore
    from curate.io.writers import write_json, write_parquet
    from curate.preference.diagnostics import Diagnose

    step = Diagnose(model=model, scorers=tuple(scorers), max_length=max_length, batch_size=batch_size, device=device)
    table = _read(input_path)
    _require_pairs(table, input_path)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res, summary = step.run(table, FeatureStore(out / "features"), device)
    joined = table.join(res.rename({c: f"diagnose__{c}" for c in res.columns if c != "uid"}), on="uid", how="left",
                        maintain_order="left")
    write_parquet(joined, out / "diagnostics.parquet")
    summary = {"command": "diagnose", "input": input_path, "model": model, "scorers": list(scorers),
               "seconds": round(time.time() - t0, 2), **summary}
    write_json(summary, out / "summary.json")
    ra = summary.get("ranking_accuracy", {})
    lb = summary.get("length_bias", {})
    _emit(as_json, summary, [
        f"{table.height} pairs; ranking accuracy (sum) {ra.get('sum', float('nan')):.3f}, "
        f"per-token {ra.get('per_token', float('nan')):.3f}",
        f"length bias: p_longer {lb.get('p_longer', float('nan')):.3f}, slope {lb.get('logistic_slope', 0):.3f}",
        f"flags: {summary.get('length_flags')}, agreement {summary.get('agreement')}, rm {summary.get('rm_flags')}",
        f"outputs in {out}"])


@click.command()
@click.argument("input_path", metavar="IN")
@click.option("-o", "--output", required=True, help="Output parquet.")
@click.option("--by", type=click.Choice(["gap", "margin"]), default="gap", show_default=True)
@click.option("--buckets", type=int, default=None, help="N equal-count difficulty buckets.")
@click.option("--column", default=None, help="Explicit key column (larger = easier).")
@click.option("--json", "as_json", is_flag=True)
def curriculum(input_path: str, output: str, by: str, buckets: int | None, column: str | None, as_json: bool) -> None:
    """Order pairs of IN easy -> hard (Curry-DPO) by rating gap or reference margin into OUT.parquet.

    An OpenAssistant tree file (``*.jsonl`` with message trees) is turned into best-vs-rest pairs first.
    """
    from curate.io.writers import write_parquet
    from curate.preference.curriculum import curry_pairs, oasst_groups, order_curriculum

    p = Path(input_path)
    if p.suffix == ".jsonl" and _looks_like_oasst(p):
        table = curry_pairs(oasst_groups(p))
    else:
        table = pl.read_parquet(p) if p.suffix == ".parquet" else _read(input_path)
    ordered = order_curriculum(table, by=by, buckets=buckets, column=column)
    write_parquet(ordered, output)
    summary = {"command": "curriculum", "input": input_path, "output": output, "rows": ordered.height,
               "stages": int(ordered["curry__stage"].max()) if ordered.height else 0, "by": by}
    _emit(as_json, summary, [f"{ordered.height} pairs in {summary['stages']} stages -> {output}"])


def _looks_like_oasst(path: Path) -> bool:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and "message_tree_id" in obj and "prompt" in obj


@click.command(name="export")
@click.argument("input_path", metavar="IN")
@click.option("-o", "--output", required=True, help="Output file (.jsonl, .json or .parquet).")
@click.option("--format", "fmt", type=click.Choice(["trl", "sharegpt", "alpaca", "messages"]), required=True)
@click.option("--strings", "as_strings", is_flag=True, help="TRL standard format (strings) instead of messages.")
@click.option("--json", "as_json", is_flag=True)
def export(input_path: str, output: str, fmt: str, as_strings: bool, as_json: bool) -> None:
    """Export IN (curated table) to a trainer format: TRL, LLaMA-Factory ShareGPT / Alpaca, messages."""
    from curate.preference.export import write_export

    table = pl.read_parquet(input_path) if input_path.endswith(".parquet") else _read(input_path)
    if "curry__order" in table.columns:
        table = table.sort("curry__order")
    write_export(table, output, fmt, as_strings=as_strings)
    summary = {"command": "export", "input": input_path, "output": output, "format": fmt, "rows": table.height}
    _emit(as_json, summary, [f"{table.height} rows -> {output} ({fmt})"])


COMMANDS = (ches, diagnose, curriculum, export)
