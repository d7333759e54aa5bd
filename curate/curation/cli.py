"""CLI verbs of the curation stages: ``curate dedup | decontam | filter | pii``.

Each verb reads a canonical parquet table, runs the stage's steps and writes ``OUT_DIR`` with
``curated.parquet``, ``rejected.parquet`` (with ``step`` and ``reason``), ``manifest.json`` (rows in/out
and drops by reason per step, plus the step's stats) and, for dedup, ``clusters.parquet``.
Bad parameters raise :class:`~curate.errors.ParameterError` (exit 2 through ``curate.cli.main``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import polars as pl

from curate.errors import ParameterError
from curate.pipeline.outcome import reason_category
from curate.pipeline.step import StepContext, check_step_output, step_params


def _read_table(path: str) -> pl.DataFrame:
    from curate.io.tables import read_table

    return read_table(path)


def run_steps(table: pl.DataFrame, steps: list[tuple[str, Any]], out_dir: str | Path, *,
              targets: pl.DataFrame | None = None, seed: int = 0, command: str = "") -> dict[str, Any]:
    """Run ``(name, step)`` pairs in order on ``table`` and write the outputs to ``out_dir``.

    Returns the manifest (also written as ``out_dir/manifest.json``).
    """
    from curate.io.writers import write_json, write_parquet

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    alive = pl.Series([True] * table.height)
    funnel, clusters = [], []
    for i, (name, step) in enumerate(steps, start=1):
        step_dir = out_dir / "steps" / f"{i:02d}-{name}"
        step_dir.mkdir(parents=True, exist_ok=True)
        ctx = StepContext(seed=seed, targets=targets, step_dir=step_dir)
        current = table.filter(alive)
        t0 = time.time()
        res = check_step_output(name, current, step.apply(current, ctx))
        res = res.rename({c: f"{name}__{c}" for c in res.columns if c != "uid"})
        table = table.join(res, on="uid", how="left", maintain_order="left")
        kept = table[f"{name}__keep"].fill_null(False)
        dropped: dict[str, int] = {}
        for r in table.filter(alive & ~kept)[f"{name}__reason"].to_list():
            key = reason_category(r)
            dropped[key] = dropped.get(key, 0) + 1
        funnel.append({"step": name, "use": step.name, "params": step_params(step), "rows_in": int(alive.sum()),
                       "rows_out": int((alive & kept).sum()), "dropped": dropped,
                       "seconds": round(time.time() - t0, 3), **ctx.stats})
        alive = alive & kept
        if (step_dir / "clusters.parquet").exists():
            clusters.append(pl.read_parquet(step_dir / "clusters.parquet").with_columns(pl.lit(name).alias("step")))
    curated = table.filter(alive)
    rejected = table.filter(~alive)
    names = [n for n, _ in steps]
    if rejected.height:
        step_expr, reason_expr = pl.lit(None, dtype=pl.Utf8), pl.lit(None, dtype=pl.Utf8)
        for n in reversed(names):
            hit = pl.col(f"{n}__keep").is_not_null() & ~pl.col(f"{n}__keep")
            step_expr = pl.when(hit).then(pl.lit(n)).otherwise(step_expr)
            reason_expr = pl.when(hit).then(pl.col(f"{n}__reason")).otherwise(reason_expr)
        rejected = rejected.with_columns(step_expr.alias("step"), reason_expr.alias("reason"))
    write_parquet(curated, out_dir / "curated.parquet")
    write_parquet(rejected, out_dir / "rejected.parquet")
    if clusters:
        write_parquet(pl.concat(clusters, how="diagonal_relaxed"), out_dir / "clusters.parquet")
    manifest = {"command": command, "rows": {"input": table.height, "curated": curated.height,
                                             "rejected": rejected.height}, "steps": funnel,
                "curated_path": str(out_dir / "curated.parquet"), "rejected_path": str(out_dir / "rejected.parquet")}
    write_json(manifest, out_dir / "manifest.json")
    return manifest


def _emit(manifest: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(manifest, default=str))
        return
    r = manifest["rows"]
    click.echo(f"{r['input']} rows -> {r['curated']} curated, {r['rejected']} rejected")
    for s in manifest["steps"]:
        click.echo(f"  {s['step']}: {s['rows_in']} -> {s['rows_out']}  {s['dropped'] or ''}")


@click.command()
@click.argument("input_path", metavar="IN")
@click.option("-o", "--output", required=True, help="Output folder.")
@click.option("--exact", "exact", type=click.Choice(["prompt", "response", "pair"]), default=None, help="Exact dedup level.")
@click.option("--minhash", is_flag=True, help="MinHash-LSH near-duplicate dedup.")
@click.option("--threshold", type=float, default=0.8, show_default=True, help="MinHash Jaccard threshold.")
@click.option("--num-perm", type=int, default=128, show_default=True)
@click.option("--ngram", type=int, default=5, show_default=True)
@click.option("--shingle", type=click.Choice(["word", "char"]), default="word", show_default=True)
@click.option("--field", default="prompt+response", show_default=True, help="Text compared by MinHash/semantic.")
@click.option("--short-words", type=int, default=None,
              help="MinHash pass 2: rows of at most this many words also compared on word bigrams "
                   "(default 64; 0 turns pass 2 off).")
@click.option("--short-ngram", type=int, default=None, help="MinHash pass 2 word n-gram length (default 2).")
@click.option("--short-threshold", type=float, default=None, help="MinHash pass 2 Jaccard threshold (default 0.5).")
@click.option("--short-edits", type=int, default=None,
              help="MinHash pass 2: at most about this many edited words (default 2; -1: no bound).")
@click.option("--semantic", is_flag=True, help="Semantic dedup (embeddings + faiss radius search).")
@click.option("--eps", type=float, default=0.05, show_default=True, help="Semantic: cosine >= 1 - eps.")
@click.option("--model", default="default", show_default=True, help="Embedder for --semantic.")
@click.option("--json", "as_json", is_flag=True)
def dedup(input_path: str, output: str, exact: str | None, minhash: bool, threshold: float, num_perm: int, ngram: int,
          shingle: str, field: str, short_words: int | None, short_ngram: int | None, short_threshold: float | None,
          short_edits: int | None, semantic: bool, eps: float, model: str, as_json: bool) -> None:
    """Exact, MinHash and semantic dedup of IN into OUT_DIR."""
    from curate.curation.exact import ExactDedup
    from curate.curation.minhash import MinHashDedup
    from curate.curation.semantic import SemanticDedup

    steps: list[tuple[str, Any]] = []
    if exact or not (minhash or semantic):
        steps.append(("exact_dedup", ExactDedup(level=exact or "pair")))
    if minhash:
        short: dict[str, Any] = {k: v for k, v in (("short_words", short_words), ("short_ngram", short_ngram),
                                                   ("short_threshold", short_threshold), ("short_edits", short_edits))
                                 if v is not None}
        if short.get("short_edits") == -1:
            short["short_edits"] = None
        steps.append(("minhash_dedup", MinHashDedup(field=field, shingle=shingle, ngram=ngram, num_perm=num_perm,
                                                    threshold=threshold, **short)))
    if semantic:
        steps.append(("semantic_dedup", SemanticDedup(field=field, eps=eps, model=model)))
    _emit(run_steps(_read_table(input_path), steps, output, command="dedup"), as_json)


@click.command()
@click.argument("input_path", metavar="IN")
@click.option("--against", "targets", multiple=True, required=True, help="Target file or folder (repeatable).")
@click.option("-o", "--output", required=True)
@click.option("--ngram", type=int, default=13, show_default=True)
@click.option("--embedding-threshold", type=float, default=None, help="Also flag cosine >= this to a target.")
@click.option("--index", "index_path", default=None, help="Folder of a saved n-gram index (made if absent).")
@click.option("--json", "as_json", is_flag=True)
def decontam(input_path: str, targets: tuple[str, ...], output: str, ngram: int, embedding_threshold: float | None,
             index_path: str | None, as_json: bool) -> None:
    """Flag rows of IN overlapping the TARGET sets (n-grams, optionally embeddings)."""
    from curate.curation.decontam import Decontam, read_targets

    step = Decontam(ngram=ngram, embedding_threshold=embedding_threshold, index_path=index_path)
    target_table = read_targets(list(targets))
    _emit(run_steps(_read_table(input_path), [("decontam", step)], output, targets=target_table, command="decontam"),
          as_json)


def _parse_rules(rules: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    out = {}
    for r in rules:
        if "=" not in r:
            raise ParameterError(f"--rule expects NAME=VALUE. Got {r!r}.")
        k, v = r.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


@click.command(name="filter")
@click.argument("input_path", metavar="IN")
@click.option("-o", "--output", required=True)
@click.option("--rule", "rules", multiple=True, help="Filter parameter NAME=VALUE (e.g. max_chars=20000).")
@click.option("--json", "as_json", is_flag=True)
def filter_(input_path: str, output: str, rules: tuple[str, ...], as_json: bool) -> None:
    """Heuristic quality filters with named reasons."""
    import dataclasses

    from curate.curation.filters import HeuristicFilter

    params = _parse_rules(rules)
    valid = {f.name for f in dataclasses.fields(HeuristicFilter)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ParameterError(f"unknown filter rule(s) {unknown}. Valid: {sorted(valid)}.")
    _emit(run_steps(_read_table(input_path), [("filter", HeuristicFilter(**params))], output, command="filter"), as_json)


@click.command()
@click.argument("input_path", metavar="IN")
@click.option("-o", "--output", required=True)
@click.option("--redact", is_flag=True, help="Write curated.parquet with PII replaced by [EMAIL], [PHONE], ...")
@click.option("--drop", is_flag=True, help="Drop rows containing PII.")
@click.option("--json", "as_json", is_flag=True)
def pii(input_path: str, output: str, redact: bool, drop: bool, as_json: bool) -> None:
    """Detect PII; flag (default), drop or redact."""
    from curate.curation.pii import PII, redact_table
    from curate.io.writers import write_parquet

    table = _read_table(input_path)
    action = "drop" if drop else "redact" if redact else "flag"
    manifest = run_steps(table, [("pii", PII(action=action))], output, command="pii")
    if redact:
        curated = pl.read_parquet(Path(output) / "curated.parquet")
        write_parquet(redact_table(curated), Path(output) / "curated.parquet")
    _emit(manifest, as_json)


COMMANDS = (dedup, decontam, filter_, pii)
