"""The README's main job, timed: ``pipelines/demo.yaml`` as shipped vs the same recipe aimed at every
target row (the earlier demo), in one process, fresh run folders, the embedding cache off.

Both variants decontaminate against the full benchmarks; they differ only in the recipe's
``targets`` (a seeded sample of 250 per task, all 164 HumanEval problems, vs all 3,554 rows), which
TAROT aims at and the embed step embeds. Reported per variant: wall time, the slowest steps, rows
curated; and how alike the two subsets are (Jaccard of the curated uids, and the share of curated
rows per source), so "the same kind of result" is a number.

    .venv/bin/python benchmarks/bench_demo.py
Appends one JSON line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, peak_rss_mb, record  # noqa: E402

RECIPE = HERE.parent / "pipelines" / "demo.yaml"


def _full_targets(raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe with every target row (no ``sample``)."""
    out = copy.deepcopy(raw)
    out["targets"] = [t["path"] if isinstance(t, dict) else t for t in raw["targets"]]
    return out


def _run(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    import polars as pl

    import curate

    recipe = curate.parse_recipe(raw, base=RECIPE.parent, source=str(RECIPE.relative_to(HERE.parent)))
    t0 = time.perf_counter()
    res = curate.run_recipe(recipe, run_dir=folder)
    wall = time.perf_counter() - t0
    steps = {s["step"]: round(float(s["seconds"]), 2) for s in res.manifest["steps"]}
    cur = pl.read_parquet(folder / "curated.parquet")
    share = (cur.with_columns(pl.col("source").str.extract(r"([a-z_]+alpaca)[^/]*$").alias("src"))
             .group_by("src").len().sort("src"))
    return {"wall_s": round(wall, 2), "steps_s": steps, "curated": res.n_curated,
            "source_share": {r["src"]: round(r["len"] / cur.height, 3) for r in share.iter_rows(named=True)},
            "uids": set(cur["uid"].to_list())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="time the shipped recipe only (no baseline)")
    args = ap.parse_args()
    os.environ["CURATE_EMBED_CACHE"] = "0"  # a fresh clone has no cache
    raw = yaml.safe_load(RECIPE.read_text())
    variants = {"shipped": raw} if args.quick else {"all_targets": _full_targets(raw), "shipped": raw}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="curate-demo-bench-") as tmp:
        for name, r in variants.items():
            out[name] = _run(r, Path(tmp) / name)
            print(name, {k: v for k, v in out[name].items() if k != "uids"}, flush=True)
    metrics: dict[str, Any] = {f"{n}_{k}": v for n, o in out.items() for k, v in o.items() if k != "uids"}
    if "all_targets" in out:
        a, b = out["all_targets"]["uids"], out["shipped"]["uids"]
        metrics["curated_jaccard"] = round(len(a & b) / len(a | b), 3)
        metrics["speedup"] = round(out["all_targets"]["wall_s"] / out["shipped"]["wall_s"], 2)
    metrics["peak_rss_mb"] = peak_rss_mb()
    metrics["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    record("demo", {"recipe": "pipelines/demo.yaml", "embed_cache": "off"}, metrics,
                 notes="`python benchmarks/bench_demo.py`")


if __name__ == "__main__":
    main()
