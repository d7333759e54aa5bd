"""``curate mix``: combine the curated subsets of several runs in set proportions under one budget.

Each input is a run folder (``curate run`` or ``curate select`` output, read through its
``curated.parquet``) or a parquet table. The mix

1. reads every input's curated rows in the run's own pick order (``rank`` from
   ``selection.parquet``, else the last ``<step>__rank`` column, else file order);
2. drops exact duplicates across inputs by uid, keeping the copy of the first input that holds it
   (``duplicate_of: <input>``);
3. spends the budget with the stratified budget of every selector (group = input, ``ratios`` =
   ``--ratio``, largest-remainder quotas, each input's own order inside its quota, rows beyond it
   ``over_quota: <input>``), so infeasible ratios exit 2 naming the inputs and shortfalls before
   anything is written;
4. writes, through the writer of every run (:func:`curate.pipeline.outcome.write_outcome`),
   ``curated.parquet`` (with ``mix_input`` and the ``mix__keep`` / ``mix__reason`` step columns, by
   input then pick order), ``rejected.parquet`` (with ``step`` = ``mix`` and ``reason``) and
   ``manifest.json`` (inputs with sha256, asked and realised ratios in rows and budget units,
   duplicates removed, token accounting).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np
import polars as pl

from curate.errors import RecipeError
from curate.selectors.base import Budget

MIX_INPUT = "mix_input"
_ORDER = "__mix_order"


def _curated_path(item: str) -> Path:
    p = Path(item)
    if p.is_dir():
        if not (p / "curated.parquet").exists():
            raise RecipeError(f"{p} is not a finished run folder (no curated.parquet).")
        return p / "curated.parquet"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist.")
    return p


def _read_input(item: str) -> pl.DataFrame:
    """The curated rows of one input in its pick order, with exact ``n_tokens`` when counted."""
    path = _curated_path(item)
    table = pl.read_parquet(path)
    if "uid" not in table.columns:
        raise RecipeError(f"{path}: no uid column; is it a curate table?")
    order = None
    sel = path.parent / "selection.parquet"
    if sel.exists():
        ranks = pl.read_parquet(sel).select("uid", "rank")
        table = table.join(ranks, on="uid", how="left", maintain_order="left")
        order = table["rank"]
        table = table.drop("rank")
    else:
        rank_cols = [c for c in table.columns if c.endswith("__rank")]
        if rank_cols:
            order = table[rank_cols[-1]]
    pos = np.arange(table.height, dtype=np.float64)
    if order is not None:
        vals = order.cast(pl.Float64).fill_null(np.inf).to_numpy()
        pos = np.lexsort((pos, vals)).argsort().astype(np.float64)
    from curate.curation.tokens import resolve_column
    from curate.errors import SchemaError

    try:
        col = resolve_column(table, "n_tokens")
        counted = table[col].cast(pl.Int64)
    except SchemaError:
        counted = pl.Series([None] * table.height, dtype=pl.Int64)
    keep = [c for c in table.columns if "__" not in c and c not in ("n_tokens", "n_prompt_tokens", "n_response_tokens")]
    return table.select(keep).with_columns(pl.Series(_ORDER, pos), counted.alias("n_tokens"))


def mix_runs(inputs: Sequence[str], out_dir: str | Path, *, ratios: Sequence[float], budget: Any,
             labels: Sequence[str] | None = None, tokenizer: str | None = None, overshoot: bool = False,
             ) -> dict[str, Any]:
    """Mix the curated rows of ``inputs`` in proportions ``ratios`` under ``budget``; returns the manifest.

    Raises:
        RecipeError: a bad ratio list or budget, or quotas the inputs cannot meet (QuotaError).
    """
    from curate.io.writers import sha256_file
    from curate.pipeline.outcome import write_outcome
    from curate.selectors.baselines import TopKSelector

    if len(inputs) < 2:
        raise RecipeError("curate mix needs at least two inputs.")
    if len(ratios) != len(inputs):
        raise RecipeError(f"--ratio has {len(ratios)} value(s) for {len(inputs)} input(s); give one share per input.")
    if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise RecipeError(f"--ratio shares must be >= 0 and sum to 1, got {list(ratios)} (sum {sum(ratios):g}).")
    names = list(labels) if labels else [str(i) for i in inputs]
    if len(set(names)) != len(names):
        raise RecipeError(f"the inputs need distinct names, got {names}.")
    tables, dups = [], {}
    seen: dict[str, str] = {}
    for item, name in zip(inputs, names):
        t = _read_input(item)
        dup_mask = np.array([u in seen for u in t["uid"].to_list()], dtype=bool)
        dup_of = [seen.get(u) for u in t["uid"].to_list()]
        for u in t["uid"].to_list():
            seen.setdefault(u, name)
        t = t.with_columns(pl.lit(name).alias(MIX_INPUT), pl.Series("__dup_of", dup_of, dtype=pl.Utf8))
        dups[name] = int(dup_mask.sum())
        tables.append(t)
    pool = pl.concat(tables, how="diagonal_relaxed")
    unique = pool.filter(pl.col("__dup_of").is_null()).drop("__dup_of")
    duplicates = pool.filter(pl.col("__dup_of").is_not_null())
    tok_name = None
    if tokenizer is not None:
        from curate.curation.tokens import count_table

        counts, info = count_table(unique, None if tokenizer == "default" else tokenizer)
        tok_name = info["tokenizer"]
        unique = unique.drop("n_tokens").join(counts, on="uid", how="left", maintain_order="left")
    elif unique["n_tokens"].null_count():
        unique = unique.drop("n_tokens")  # some inputs were never counted: the word estimate for all
    try:
        base = Budget.parse(budget)
        spec = {**base.describe(), "by": MIX_INPUT, "ratios": dict(zip(names, map(float, ratios)))}
        if overshoot:
            spec["overshoot"] = True
        bud = Budget.parse(spec)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc
    res = TopKSelector(column=_ORDER, descending=False).select(unique, {}, bud)
    frame = res.frame.select("uid", pl.col("keep").alias("mix__keep"), pl.col("reason").alias("mix__reason"))
    table = pl.concat([
        unique.join(frame, on="uid", how="left", maintain_order="left").sort(MIX_INPUT, _ORDER),
        duplicates.with_columns(pl.lit(False).alias("mix__keep"), ("duplicate_of: " + pl.col("__dup_of")).alias(
            "mix__reason")).drop("__dup_of"),
    ], how="diagonal_relaxed").drop(_ORDER)
    comp = res.diagnostics["groups"]["composition"]
    kept_units = sum(c["kept_units"] for c in comp.values()) or 1.0
    realised = {n: {"asked": float(r), "rows": comp.get(n, {}).get("kept_rows", 0),
                    "units": comp.get(n, {}).get("kept_units", 0.0),
                    "share": comp.get(n, {}).get("kept_units", 0.0) / kept_units,
                    "duplicates_dropped": dups[n]} for n, r in zip(names, ratios)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = dict(res.diagnostics.get("tokens") or {})
    if tokens:
        tokens["tokenizer"] = tok_name or (None if tokens["approximate"] else "counted (n_tokens of the inputs)")
    manifest = {
        "command": "mix", "budget": bud.describe(), "unit": res.diagnostics["groups"]["unit"],
        "inputs": [{"name": n, "path": str(_curated_path(i)), "sha256": sha256_file(_curated_path(i)),
                    "rows": int((pool[MIX_INPUT] == n).sum())} for i, n in zip(inputs, names)],
        "realised": realised, "duplicates_dropped": int(duplicates.height), **({"tokens": tokens} if tokens else {}),
        "rows": {"input": table.height},
    }
    return write_outcome(out, table, table["mix__keep"], pl.DataFrame(), manifest)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--ratio expects comma-separated shares such as 0.7,0.3, got {text!r}.") from None


@click.command("mix")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--ratio", "ratio", required=True, help="One share per input, in order, e.g. 0.7,0.3.")
@click.option("--budget", required=True, help="Rows (5000), a fraction of the union (0.5) or tokens:1e7.")
@click.option("--name", "names", multiple=True, help="A name per input (default: the paths), in order.")
@click.option("--tokenizer", default=None, help="Count tokens with this tokenizer ('default': packaged SmolLM2).")
@click.option("--overshoot", is_flag=True, help="A tokens budget keeps the row that crosses each quota.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary as the last line.")
def mix(inputs: tuple[str, ...], out_dir: str, ratio: str, budget: str, names: tuple[str, ...],
        tokenizer: str | None, overshoot: bool, as_json: bool) -> None:
    """Combine the curated subsets of several runs (or tables) in set ratios under one budget."""
    import json

    manifest = mix_runs(list(inputs), out_dir, ratios=_floats(ratio), budget=budget, labels=list(names) or None,
                        tokenizer=tokenizer, overshoot=overshoot)
    summary = {"command": "mix", "output": out_dir, "kept": manifest["rows"]["curated"], "budget": manifest["budget"],
               "realised": {n: round(r["share"], 6) for n, r in manifest["realised"].items()},
               "duplicates_dropped": manifest["duplicates_dropped"]}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"mixed {manifest['rows']['curated']} rows -> {out_dir}")
        for n, r in manifest["realised"].items():
            click.echo(f"  {n}: {r['rows']} rows, {r['units']:g} {manifest['unit']} ({r['share']:.3f}; asked {r['asked']:g})")


COMMANDS = [mix]
