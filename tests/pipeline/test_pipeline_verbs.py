"""Verbs are in-memory recipes: the same steps as verbs or as one recipe give the same bytes, and
every run folder (verb, recipe, mix) has the one layout written by ``write_outcome``."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.cli import main
from curate.pipeline.outcome import OUTCOME_FILES
from curate.pipeline.verbs import run_in_memory


def _source(tmp_path: Path) -> Path:
    rows = [{"instruction": f"Explain topic number {i} in two sentences.", "input": "",
             "output": f"Topic {i} is about {'planets' if i % 2 else 'rivers'}; it matters for reason {i}."}
            for i in range(40)]
    rows += [dict(rows[3]), dict(rows[7])]  # exact duplicates
    rows.append({"instruction": "Tell me a secret.", "input": "", "output": "I'm sorry, but I cannot help with that."})
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(rows))
    return path


STEPS = [{"use": "exact_dedup", "level": "pair"}, {"use": "filter"}, {"use": "random", "budget": 10}]


def test_recipe_and_verb_chain_give_byte_identical_curated(tmp_path: Path) -> None:
    src = _source(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "seed": 3, "inputs": [str(src)], "steps": STEPS}))
    assert main(["run", str(recipe), "-o", str(tmp_path / "run"), "-q"]) == 0
    assert main(["ingest", str(src), "-o", str(tmp_path / "t.parquet"), "-q"]) == 0
    assert main(["dedup", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "d"), "--exact", "pair"]) == 0
    assert main(["filter", str(tmp_path / "d" / "curated.parquet"), "-o", str(tmp_path / "f")]) == 0
    assert main(["select", "random", str(tmp_path / "f" / "curated.parquet"), "-o", str(tmp_path / "s"),
                 "--budget", "10", "--seed", "3"]) == 0
    run, chain = tmp_path / "run", tmp_path / "s"
    assert (run / "curated.parquet").read_bytes() == (chain / "curated.parquet").read_bytes()
    assert (run / "selection.parquet").read_bytes() == (chain / "selection.parquet").read_bytes()
    cur = pl.read_parquet(run / "curated.parquet")
    assert cur.height == 10 and {"exact_dedup__keep", "filter__keep", "random__keep"} <= set(cur.columns)
    # the chain's rejected rows are spread over its folders; together they are the recipe's
    rej_run = pl.read_parquet(run / "rejected.parquet").select("uid", "step", "reason").sort("uid")
    rej_chain = pl.concat([pl.read_parquet(tmp_path / d / "rejected.parquet").select("uid", "step", "reason")
                           for d in ("d", "f", "s")]).sort("uid")
    assert rej_run.equals(rej_chain) and set(rej_run["step"]) == {"exact_dedup", "filter", "random"}
    for folder in (run, chain):
        m = json.loads((folder / "manifest.json").read_text())
        assert m["outputs"] == list(OUTCOME_FILES) and m["selection"]["n_kept"] == 10
        assert m["selected_uids_hash"] == json.loads((run / "manifest.json").read_text())["selected_uids_hash"]


def test_in_memory_call_equals_the_verb(tmp_path: Path) -> None:
    src = _source(tmp_path)
    out = run_in_memory("select", src, STEPS, seed=1)
    assert out.run_dir is None and out.selection is not None and out.curated.height == 10
    kept = set(out.selection.filter(pl.col("keep"))["uid"])
    assert kept == set(out.curated["uid"])
    folder = run_in_memory("select", src, STEPS, seed=1, out_dir=tmp_path / "o")
    assert folder.run_dir == (tmp_path / "o").resolve()
    assert folder.curated.equals(out.curated) and folder.rejected.equals(out.rejected)
    # a table in memory is taken as it is: steps chained through DataFrames equal one run
    first = run_in_memory("dedup", src, STEPS[:1])
    second = run_in_memory("rest", first.curated, STEPS[1:], seed=1)
    assert second.curated.equals(out.curated)


def test_a_verb_that_fails_leaves_no_folder(tmp_path: Path) -> None:
    src = _source(tmp_path)
    with pytest.raises(Exception, match="quotas cannot be met"):
        run_in_memory("select", src, [{"use": "random", "budget": {"n": 10, "by": "source", "min": {"nope": 5}}}],
                      out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_notebook_functions_match_the_verbs(tmp_path: Path) -> None:
    import curate

    src = _source(tmp_path)
    pool = curate.read_sources([str(src)]).table
    clean = curate.dedup(pool)
    assert main(["dedup", str(src), "-o", str(tmp_path / "d"), "--exact", "pair"]) == 0
    assert clean.curated.drop("source").equals(pl.read_parquet(tmp_path / "d" / "curated.parquet").drop("source"))
    assert clean.rejected["step"].eq("exact_dedup").all() and clean.rejected.height == 2
    fs = curate.embed(clean.curated, field="prompt", model="hashing:32")
    assert fs.values.shape == (clean.curated.height, 32) and list(fs.uids) == clean.curated["uid"].to_list()
    targets = pool.head(3).with_columns(pl.lit("target").alias("kind"))
    picked = curate.select(clean.curated, "rds", budget=5, targets=targets, embed_model="hashing:32")
    assert picked.curated.height == 5 and picked.manifest["selection"]["features"] == {
        "feats": "embed/prompt", "target_feats": "embed/prompt/targets"}
    # the three target rows are in the pool: RDS+ (cosine to targets) ranks them first
    assert set(targets["uid"]) <= set(picked.curated["uid"])
    again = curate.select(clean.curated, "rds", budget=5, targets=targets, features={"feats": curate.embed(
        clean.curated, field="prompt", model="hashing:32")}, embed_model="hashing:32")
    assert again.curated["uid"].to_list() == picked.curated["uid"].to_list()
    with pytest.raises(curate.MissingFeatureError, match="curate gradients"):
        curate.select(clean.curated, "less", budget=5)
