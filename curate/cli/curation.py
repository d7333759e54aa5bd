"""CLI verbs of the curation stages: ``curate dedup | decontam | filter | pii``.

Each verb is an in-memory recipe of the stage's steps (:mod:`curate.pipeline.verbs`): it reads IN
(a canonical parquet as it is, or any source file), runs the steps and writes the run folder
``OUT_DIR`` as ``curate run`` does (``curated.parquet``, ``rejected.parquet`` with ``step`` and
``reason``, ``manifest.json`` with the funnel, ``steps/``, ``report.html``) and, for dedup,
``clusters.parquet``.
Bad parameters raise :class:`~curate.errors.ParameterError` (exit 2 through ``curate.cli.main``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import polars as pl

from curate.cli._common import emit
from curate.errors import ParameterError


def run_steps(source: str | Path | pl.DataFrame, steps: list[dict[str, Any]], out_dir: str | Path, *,
              targets: Any = None, seed: int = 0, command: str = "") -> dict[str, Any]:
    """Run recipe ``steps`` (``{"use": ..., **params}``) on ``source`` into the run folder ``out_dir``
    (:func:`curate.pipeline.verbs.run_verb`); the dedup steps' ``clusters.parquet`` files are gathered
    into ``out_dir/clusters.parquet`` with the step that found them. Returns the manifest."""
    from curate.io.writers import write_parquet
    from curate.pipeline.verbs import run_verb

    res = run_verb(command, source, steps, out_dir, targets=targets, seed=seed)
    found = sorted((res.run_dir / "steps").glob("*/clusters.parquet"))
    if found:
        clusters = [pl.read_parquet(p).with_columns(pl.lit(p.parent.name.partition("-")[2]).alias("step"))
                    for p in found]
        write_parquet(pl.concat(clusters, how="diagonal_relaxed"), res.run_dir / "clusters.parquet")
    return res.manifest


def _emit(manifest: dict[str, Any], as_json: bool) -> None:
    r = manifest["rows"]
    lines = [f"{r['input']} rows -> {r['curated']} curated, {r['rejected']} rejected"]
    lines += [f"  {s['step']}: {s['rows_in']} -> {s['rows_out']}  {s['dropped'] or ''}"
              for s in manifest["steps"][1:]]  # the first entry is the ingest
    emit(as_json, manifest, lines)


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
    steps: list[dict[str, Any]] = []
    if exact or not (minhash or semantic):
        steps.append({"use": "exact_dedup", "level": exact or "pair"})
    if minhash:
        short: dict[str, Any] = {k: v for k, v in (("short_words", short_words), ("short_ngram", short_ngram),
                                                   ("short_threshold", short_threshold), ("short_edits", short_edits))
                                 if v is not None}
        if short.get("short_edits") == -1:
            short["short_edits"] = None
        steps.append({"use": "minhash_dedup", "field": field, "shingle": shingle, "ngram": ngram, "num_perm": num_perm,
                      "threshold": threshold, **short})
    if semantic:
        steps.append({"use": "semantic_dedup", "field": field, "eps": eps, "model": model})
    _emit(run_steps(input_path, steps, output, command="dedup"), as_json)


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
    from curate.curation.decontam import check_target_paths

    check_target_paths(targets)
    step = {"use": "decontam", "ngram": ngram, "embedding_threshold": embedding_threshold,
            "index_path": None if index_path is None else str(Path(index_path).resolve())}
    _emit(run_steps(input_path, [step], output, targets=[{"path": t, "kind": "target"} for t in targets],
                    command="decontam"), as_json)


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
    _emit(run_steps(input_path, [{"use": "filter", **params}], output, command="filter"), as_json)


@click.command()
@click.argument("input_path", metavar="IN")
@click.option("-o", "--output", required=True)
@click.option("--redact", is_flag=True, help="Write curated.parquet with PII replaced by [EMAIL], [PHONE], ...")
@click.option("--drop", is_flag=True, help="Drop rows containing PII.")
@click.option("--json", "as_json", is_flag=True)
def pii(input_path: str, output: str, redact: bool, drop: bool, as_json: bool) -> None:
    """Detect PII; flag (default), drop or redact."""
    action = "drop" if drop else "redact" if redact else "flag"
    _emit(run_steps(input_path, [{"use": "pii", "action": action}], output, command="pii"), as_json)


COMMANDS = (dedup, decontam, filter_, pii)
