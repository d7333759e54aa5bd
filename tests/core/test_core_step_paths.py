"""Step parameters that are paths: resolved against the recipe file's folder, keyed by content.

A recipe that names ``./targets.jsonl`` means the file beside the recipe, whatever the working
directory; feature names and Hub ids that look like relative paths stay as written; ``--set``
values resolve where the user typed them. A saved index used as input enters the step's cache key
by its bytes, while a recipe that writes the index is cached on its second run. The run manifest
carries the selector's token count and the tokenizer that made it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.curation.decontam import NgramIndex, read_targets, target_texts
from curate.errors import RecipeError
from curate.pipeline.recipe import load_recipe, path_markers
from curate.pipeline.registry import load_steps
from curate.pipeline.runner import run_recipe

# Pool rows 0..11; rows 3 and 8 repeat a target's text word for word.
TARGET_A = "the quick brown fox jumps over the lazy dog near the river bank"
TARGET_B = "seven silver swans swim slowly under the old stone bridge at dawn"


def _pool(path: Path) -> Path:
    rows = []
    for i in range(12):
        text = TARGET_A if i == 3 else TARGET_B if i == 8 else f"row {i} talks about topic number {i} in plain words"
        rows.append({"instruction": text, "input": "", "output": f"answer {i} " + "word " * (i + 1)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _targets(path: Path, text: str) -> Path:
    path.write_text(json.dumps({"instruction": text, "input": "", "output": "x"}) + "\n")
    return path


def _write_recipe(folder: Path, steps: list[dict], **top) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _pool(folder / "pool.jsonl")
    raw = {"name": "paths", "seed": 1, "inputs": ["pool.jsonl"], "output": "runs", "steps": steps, **top}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_relative_step_path_resolves_against_recipe_folder(tmp_path, monkeypatch):
    rec = tmp_path / "project"
    (rec / "bench").mkdir(parents=True)
    _targets(rec / "bench" / "targets.jsonl", TARGET_A)
    _write_recipe(rec, [{"use": "decontam", "targets": ["./bench/targets.jsonl"], "ngram": 5, "min_tokens": 3}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the old code looked for ./bench/targets.jsonl here
    recipe = load_recipe(rec / "recipe.yaml")
    assert recipe.steps[0].params["targets"] == [str(rec / "bench" / "targets.jsonl")]
    res = run_recipe(recipe, run_dir=tmp_path / "run")
    assert res.n_curated == 11 and sum(res.funnel[1]["dropped"].values()) == 1
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert resolved["steps"][0]["targets"] == [str(rec / "bench" / "targets.jsonl")]
    # the same recipe loaded from its own folder is the same recipe (same hash, same run folder)
    monkeypatch.chdir(rec)
    assert load_recipe("recipe.yaml").hash() == recipe.hash()


def test_names_uris_absolute_and_home_paths_stay_as_written(tmp_path, monkeypatch):
    rec = tmp_path / "r"
    (rec / "models" / "local").mkdir(parents=True)
    absolute = str(tmp_path / "abs_out.jsonl")
    path = _write_recipe(rec, [
        {"use": "embed", "model": "HuggingFaceTB/SmolLM2-135M"},   # a Hub id: no such folder here
        {"use": "semantic_dedup", "model": "models/local", "feature": "embed/prompt+response"},
        {"use": "count_tokens", "tokenizer": "./tok"},            # ./ marks a path even before it exists
        {"use": "kcenter", "budget": 5, "features": {"embed": "embed/prompt+response"}},
        {"use": "export", "name": "e1", "path": absolute},
        {"use": "export", "name": "e2", "path": "~/curate-never-written.jsonl"},
        {"use": "grad_features", "checkpoints": ["from_step"]},
    ])
    monkeypatch.chdir(tmp_path)
    p = {s.name: s.params for s in load_recipe(path).steps}
    assert p["embed"]["model"] == "HuggingFaceTB/SmolLM2-135M"
    assert p["semantic_dedup"]["model"] == str(rec / "models" / "local")
    assert p["semantic_dedup"]["feature"] == "embed/prompt+response"
    assert p["count_tokens"]["tokenizer"] == str(rec / "tok")
    assert p["kcenter"]["features"] == {"embed": "embed/prompt+response"}
    assert p["e1"]["path"] == absolute
    assert p["e2"]["path"] == "~/curate-never-written.jsonl"
    assert p["grad_features"]["checkpoints"] == ["from_step"]


def test_set_override_resolves_against_working_directory(tmp_path, monkeypatch):
    rec = tmp_path / "r"
    (rec / "bench").mkdir(parents=True)
    _targets(rec / "bench" / "t.jsonl", TARGET_A)
    path = _write_recipe(rec, [{"use": "decontam", "targets": ["bench/t.jsonl"], "ngram": 5, "min_tokens": 3}])
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _targets(cwd / "mine.jsonl", TARGET_B)
    monkeypatch.chdir(cwd)
    recipe = load_recipe(path, ["steps.decontam.targets=[mine.jsonl]"])
    assert recipe.steps[0].params["targets"] == [str(cwd / "mine.jsonl")]


def test_every_marker_names_a_parameter_of_its_step():
    for use, cls in load_steps().items():
        fields = {f.name for f in dataclasses.fields(cls)}
        paths, names = path_markers(cls)
        assert set(paths) | set(names) <= fields, use
        assert not set(paths) & set(names), use
    assert path_markers(load_steps()["critiq_annotate"])[0] == ("criteria", "output", "cache")
    assert "pairs" in path_markers(load_steps()["critiq"])[0]  # the selector step inherits its selector's


def _index(folder: Path, text: str, tmp: Path) -> Path:
    t_texts, t_uids = target_texts(read_targets([str(_targets(tmp / f"t{abs(hash(text))}.jsonl", text))]), ("prompt",))
    NgramIndex.build(t_texts, t_uids, ngram=5, min_tokens=3).save(folder)
    return folder


def test_prebuilt_index_enters_the_cache_key_by_content(tmp_path, monkeypatch):
    rec = tmp_path / "r"
    rec.mkdir()
    _index(rec / "idx", TARGET_A, tmp_path)
    path = _write_recipe(rec, [{"use": "decontam", "index_path": "idx", "ngram": 5, "min_tokens": 3}])
    monkeypatch.chdir(tmp_path)
    first = run_recipe(load_recipe(path), run_dir=tmp_path / "run")
    assert first.n_curated == 11
    again = run_recipe(load_recipe(path), run_dir=tmp_path / "run")
    assert again.funnel[1]["cached"] and again.n_curated == 11
    # the same folder now holds an index of other targets: the old result must not be reused
    import shutil

    shutil.rmtree(rec / "idx")
    _index(rec / "idx", TARGET_B, tmp_path)
    with pytest.raises(RecipeError, match="different recipe or input"):
        run_recipe(load_recipe(path), run_dir=tmp_path / "run")
    redone = run_recipe(load_recipe(path), run_dir=tmp_path / "run", overwrite=True)
    assert not redone.funnel[1]["cached"]
    kept = pl.read_parquet(tmp_path / "run" / "curated.parquet")["uid"].to_list()
    assert set(kept) != set(pl.read_parquet(tmp_path / "run" / "steps" / "00-ingest" / "table.parquet")["uid"]
                            .to_list()) and len(kept) == 11
    dropped = pl.read_parquet(tmp_path / "run" / "rejected.parquet")
    assert dropped.height == 1 and "swans" in json.dumps(dropped.row(0, named=True), default=str)


def test_recipe_that_writes_its_index_is_cached_on_rerun(tmp_path):
    rec = tmp_path / "r"
    rec.mkdir()
    _targets(rec / "t.jsonl", TARGET_A)
    path = _write_recipe(rec, [{"use": "decontam", "targets": ["t.jsonl"], "index_path": "out/idx", "ngram": 5,
                                "min_tokens": 3}])
    first = run_recipe(load_recipe(path), run_dir=tmp_path / "run")
    assert (rec / "out" / "idx" / "index.json").exists() and not first.funnel[1]["cached"]
    again = run_recipe(load_recipe(path), run_dir=tmp_path / "run")
    assert again.funnel[1]["cached"] and again.n_curated == first.n_curated == 11


def test_manifest_records_the_selection_token_block(tmp_path):
    rec = tmp_path / "r"
    path = _write_recipe(rec, [{"use": "count_tokens"}, {"use": "random", "budget": "tokens:60"}])
    res = run_recipe(load_recipe(path), run_dir=tmp_path / "run")
    tok = json.loads((tmp_path / "run" / "manifest.json").read_text())["tokens"]
    curated = pl.read_parquet(tmp_path / "run" / "curated.parquet")
    assert tok["tokenizer"] == "smollm2-135m-instruct" and tok["approximate"] is False
    assert tok["counted_by"] == "count_tokens__n_tokens" and tok["step"] == "random"
    assert tok["curated"] == curated["count_tokens__n_tokens"].sum() <= 60
    assert res.manifest["tokens"] == tok
    # without counts: the word estimate, marked approximate, no tokenizer
    path2 = _write_recipe(tmp_path / "r2", [{"use": "random", "budget": "tokens:60"}])
    tok2 = run_recipe(load_recipe(path2), run_dir=tmp_path / "run2").manifest["tokens"]
    assert tok2["approximate"] is True and tok2["tokenizer"] is None and 0 < tok2["curated"] <= 60
    # a row budget reports no token block
    path3 = _write_recipe(tmp_path / "r3", [{"use": "random", "budget": 5}])
    assert "tokens" not in run_recipe(load_recipe(path3), run_dir=tmp_path / "run3").manifest
