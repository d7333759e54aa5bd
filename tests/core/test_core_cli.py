"""The CLI contract: verbs, --json last line, exit codes, no partial outputs, run folders, reruns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from curate.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, dict | None, str]:
    code = main(args)
    out, err = capsys.readouterr()
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    summary = None
    if lines:
        try:
            summary = json.loads(lines[-1])
        except json.JSONDecodeError:
            summary = None
    return code, summary, err


@pytest.mark.parametrize(
    ("rel", "kind", "rows", "rejected"),
    [
        ("hh-rlhf/harmless-base_test.jsonl.gz", "preference", 2307, 5),
        ("pandalm/testset-v1.json", "preference", 894, 105),
        ("oasst1_openassistant/en_100_tree.jsonl", "preference", 212, None),
        ("alpaca_eval/alpaca-7b__alpaca_eval_gpt4__annotations.json", "preference", 789, 16),
        ("alpaca/alpaca_5000.json", "sft", 5000, 0),
        ("gsm8k/test.jsonl", "target", 1319, 0),
        ("mmlu/val", "target", 1531, 0),
        ("ifeval/input_data.jsonl", "target", 540, 0),
    ],
)
def test_ingest_real_files(data_dir, tmp_path, capsys, rel, kind, rows, rejected):
    out = tmp_path / "x.parquet"
    code, summary, err = run_cli(["ingest", str(data_dir / rel), "-o", str(out), "--json"], capsys)
    assert code == 0, err
    assert summary["kind"] == kind and summary["rows"] == rows
    if rejected is not None:
        assert summary["rejected"] == rejected
    table = pl.read_parquet(out)
    assert table.height == rows and table["uid"].n_unique() == rows


def test_ingest_twice_gives_identical_uids(data_dir, tmp_path, capsys):
    src = str(data_dir / "alpaca/alpaca_5000.json")
    for name in ("a", "b"):
        assert run_cli(["ingest", src, "-o", str(tmp_path / f"{name}.parquet"), "--quiet"], capsys)[0] == 0
    a, b = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "b.parquet")
    assert a["uid"].to_list() == b["uid"].to_list()


@pytest.mark.parametrize(
    ("content", "where", "field"),
    [
        ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "inp', ":2", None),
        ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": 5, "input": "", "output": "b"}\n', ":2", "instruction"),
        ("", "empty", None),
    ],
)
def test_bad_input_exits_2_names_place_and_writes_nothing(tmp_path, capsys, content, where, field):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    out = tmp_path / "out.parquet"
    code, _, err = run_cli(["ingest", str(src), "-o", str(out)], capsys)
    assert code == 2
    assert "bad.jsonl" in err and where in err
    if field:
        assert field in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_on_error_skip_writes_rejects(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "a", "input": "", "output": "b"}\n{broken\n{"instruction": "c", "input": "", "output": "d"}\n')
    out = tmp_path / "out.parquet"
    code, summary, err = run_cli(["ingest", str(src), "-o", str(out), "--on-error", "skip", "--json"], capsys)
    assert code == 0, err
    assert summary["rows"] == 2 and summary["rejected"] == 1
    rej = pl.read_parquet(summary["rejected_path"])
    assert rej["source_line"].to_list() == [2]


def test_unknown_option_is_usage_error(capsys):
    assert main(["ingest", "--nope"]) == 2


def _recipe(tmp_path: Path, data_dir: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""
name: t
seed: 3
inputs: ["{data_dir / 'llama-factory/alpaca_en_demo.json'}"]
output: {tmp_path / 'runs'}
steps:
  - use: kind_filter
    kinds: [sft]
  - use: sample
    n: 100
"""
    )
    return recipe


def test_run_writes_run_folder_and_rerun_skips(tmp_path, data_dir, capsys):
    recipe = _recipe(tmp_path, data_dir)
    code, summary, err = run_cli(["run", str(recipe), "--json", "--quiet"], capsys)
    assert code == 0, err
    run_dir = Path(summary["run_dir"])
    for name in ("recipe.resolved.yaml", "manifest.json", "curated.parquet", "rejected.parquet",
                 "steps/00-ingest/DONE", "steps/01-kind_filter/DONE", "steps/02-sample/table.parquet"):
        assert (run_dir / name).exists(), name
    curated, rejected = pl.read_parquet(run_dir / "curated.parquet"), pl.read_parquet(run_dir / "rejected.parquet")
    assert curated.height == 100 and rejected.height == summary["rows_in"] - 100
    assert set(rejected["step"]) == {"sample"} and all(rejected["reason"])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["inputs"][0]["sha256"] and manifest["rows"]["curated"] == 100
    assert [s["rows_out"] for s in manifest["steps"]] == [summary["rows_in"], summary["rows_in"], 100]
    before = (run_dir / "curated.parquet").read_bytes()

    code, again, _ = run_cli(["run", str(recipe), "--json", "--quiet"], capsys)
    assert code == 0 and all(s["cached"] for s in again["steps"])
    assert (run_dir / "curated.parquet").read_bytes() == before

    code, shown, _ = run_cli(["show", str(run_dir), "--json"], capsys)
    assert code == 0 and shown["rows"]["curated"] == 100


def test_set_override_and_refusal_of_changed_recipe_in_same_folder(tmp_path, data_dir, capsys):
    recipe = _recipe(tmp_path, data_dir)
    run_dir = tmp_path / "fixed"
    assert run_cli(["run", str(recipe), "-o", str(run_dir), "--quiet"], capsys)[0] == 0
    code, _, err = run_cli(["run", str(recipe), "-o", str(run_dir), "--set", "steps.sample.n=50", "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err
    code, summary, _ = run_cli(["run", str(recipe), "-o", str(run_dir), "--set", "steps.sample.n=50", "--overwrite",
                                "--json", "--quiet"], capsys)
    assert code == 0 and summary["curated"] == 50
    assert [s["cached"] for s in summary["steps"]] == [True, True, False]


def test_validate_and_list(tmp_path, data_dir, capsys):
    recipe = _recipe(tmp_path, data_dir)
    code, summary, _ = run_cli(["validate", str(recipe), "--json"], capsys)
    assert code == 0 and summary["valid"] and summary["steps"] == ["kind_filter", "sample"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ninputs: [x]\nstepz: []\n")
    code, _, err = run_cli(["validate", str(bad)], capsys)
    assert code == 2 and "stepz" in err and "Valid keys" in err
    code, summary, _ = run_cli(["list", "--json"], capsys)
    assert code == 0 and "sample" in summary["steps"] and "alpaca" in summary["formats"]


def test_console_script_exit_code_and_json_last_line(tmp_path):
    exe = Path(sys.executable).with_name("curate")
    if not exe.exists():
        pytest.skip("console script not installed")
    proc = subprocess.run([str(exe), "list", "--json"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert "steps" in json.loads(proc.stdout.strip().splitlines()[-1])
    proc = subprocess.run([str(exe), "inspect", str(tmp_path / "missing.parquet")], capture_output=True, text=True, check=False)
    assert proc.returncode == 2


def test_bad_executor_settings_exit_2(tmp_path, data_dir, capsys):
    recipe = _recipe(tmp_path, data_dir)
    code, _, err = run_cli(["run", str(recipe), "--executor", "dask"], capsys)
    assert code == 2 and "dask" in err
    code, _, err = run_cli(["run", str(recipe), "--executor", "local", "--ray-address", "127.0.0.1:6379"], capsys)
    assert code == 2 and "--ray-address" in err
    bad = tmp_path / "bad_exec.yaml"
    bad.write_text(recipe.read_text().replace("seed: 3", "seed: 3\nexecutor: spark"))
    code, _, err = run_cli(["validate", str(bad)], capsys)
    assert code == 2 and "executor" in err and "spark" in err
