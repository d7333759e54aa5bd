"""CLI verbs of influence functions: ``curate influence fit | score`` (docs/methods/ekfac.md).

``fit`` writes a factors folder (``factors.pt``, ``arguments.json`` with the fit arguments, the
model, checkpoint and a weight fingerprint). ``score`` writes a score folder: the
(candidates × targets) feature set that ``curate select --scores DIR`` reads, ``targets.parquet``
(column order) and ``aggregates.parquet`` (per-candidate mean / max / min over targets).
Bad input raises :mod:`curate.errors` types, which ``curate.cli.main`` maps to exit code 2.
"""

from __future__ import annotations

import json
import time

import click

from curate.cli._common import emit as _emit
from curate.cli._common import read_table as _read
from curate.errors import ParameterError

STRATEGIES = ("ekfac", "kfac", "diagonal", "identity")


def _damping(value: str | None) -> float | str:
    if value is None:
        return "default"
    if value in ("heuristic", "none", "None"):
        return "heuristic"
    try:
        x = float(value)
    except ValueError:
        raise ParameterError(f"The 'damping' parameter of influence score must be 'heuristic' or a float >= 0. "
                             f"Got {value!r}.") from None
    if not x >= 0:
        raise ParameterError(f"The 'damping' parameter of influence score must be 'heuristic' or a float >= 0. Got {x!r}.")
    return x


def _peak_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@click.group()
def influence() -> None:
    """Influence functions: EK-FAC (or K-FAC, diagonal, identity) factors and pairwise scores."""


@influence.command("fit")
@click.argument("input_path", metavar="IN.parquet")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Factors folder.")
@click.option("--model", default="default", show_default=True, help="'default' (SmolLM2-135M-Instruct) or a local HF folder.")
@click.option("--checkpoint", default=None, type=click.Path(), help="peft adapter or model folder applied to --model.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="ekfac", show_default=True)
@click.option("--modules", default="mlp", show_default=True, help="mlp | mlp+attn | all | NAME,NAME,...")
@click.option("--max-examples", type=int, default=2000, show_default=True, help="Fit on a seeded sample of at most N rows.")
@click.option("--fisher", type=click.Choice(["true", "empirical"]), default="true", show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True, help="Tokens per row (truncated).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary as the last line.")
def fit_cmd(input_path: str, output: str, model: str, checkpoint: str | None, strategy: str, modules: str,
            max_examples: int, fisher: str, max_length: int, batch_size: int, seed: int, device: str,
            as_json: bool) -> None:
    """Fit curvature factors of a causal LM on the candidate rows of IN.parquet."""
    from curate.influence.api import fit_table

    if max_length < 2:
        raise ParameterError(f"The 'max_length' parameter of influence fit must be >= 2. Got {max_length!r}.")
    table = _read(input_path, "input")
    t0 = time.perf_counter()
    out = fit_table(table, output, model=model, checkpoint=checkpoint, strategy=strategy, modules=modules,
                    fisher=fisher, max_examples=max_examples, batch_size=batch_size, max_length=max_length,
                    device=device, seed=seed)
    info = json.loads((out / "arguments.json").read_text())
    summary = {"command": "influence fit", "output": str(out), "rows": table.height, "n_fit": info["n_seq"],
               "n_tokens": info["n_tokens"], "strategy": strategy, "modules": len(info["names"]),
               "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": _peak_mb()}
    _emit(as_json, summary, [f"fitted {strategy} factors of {len(info['names'])} modules on {info['n_seq']} rows "
                             f"-> {out}"])


@influence.command("score")
@click.argument("input_path", metavar="IN.parquet")
@click.option("--target", "target_path", required=True, help="Target table (rows with answers).")
@click.option("--factors", "factors_dir", required=True, type=click.Path(), help="Folder from `curate influence fit`.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Score folder.")
@click.option("--damping", default=None, help="'heuristic' (0.1 x mean eigenvalue) or an absolute float "
              "[default: the factors' setting, heuristic].")
@click.option("--query-rank", type=int, default=None, help="Rank of the preconditioned target gradients.")
@click.option("--tfidf-top", type=int, default=None, help="Score only the top-K candidates per target by TF-IDF.")
@click.option("--normalize", type=click.Choice(["none", "by_n_train", "cosine"]), default="none", show_default=True)
@click.option("--model", default=None, help="Override the model recorded in the factors (must be the same weights).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--query-batch-size", type=int, default=8, show_default=True, help="Targets preconditioned at a time.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary as the last line.")
def score_cmd(input_path: str, target_path: str, factors_dir: str, output: str, damping: str | None,
              query_rank: int | None, tfidf_top: int | None, normalize: str, model: str | None, batch_size: int,
              query_batch_size: int, device: str, as_json: bool) -> None:
    """Influence of every candidate of IN.parquet on every target (positive = lowers the target loss)."""
    import numpy as np

    from curate.influence.api import save_scores, score_tables

    for name, v in (("query_rank", query_rank), ("tfidf_top", tfidf_top), ("batch_size", batch_size),
                    ("query_batch_size", query_batch_size)):
        if v is not None and v < 1:
            raise ParameterError(f"The '{name}' parameter of influence score must be an integer >= 1. Got {v!r}.")
    table = _read(input_path, "input")
    targets = _read(target_path, "target")
    t0 = time.perf_counter()
    s = score_tables(table, targets, factors_dir, model=model, damping=_damping(damping), query_rank=query_rank,
                     tfidf_top=tfidf_top, batch_size=batch_size, device=device, normalize=normalize,
                     query_batch_size=query_batch_size)
    out = save_scores(s, output)
    finite = np.isfinite(s.values)
    summary = {"command": "influence score", "output": str(out), "n_targets": len(s.query_uids),
               "n_candidates": len(s.train_uids), "pairs_scored": int(finite.sum()),
               "strategy": s.meta["strategy"], "query_rank": query_rank, "tfidf_top": tfidf_top,
               "mean_score": float(np.nanmean(s.values)) if finite.any() else None,
               "seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": _peak_mb()}
    _emit(as_json, summary, [f"scored {len(s.train_uids)} candidates x {len(s.query_uids)} targets "
                             f"({int(finite.sum())} pairs) -> {out}"])


COMMANDS = (influence,)
