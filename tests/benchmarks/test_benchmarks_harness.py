"""The benchmark harness: results.jsonl -> RESULTS.md, and run.py's subprocess handling (no timings)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mr():
    return _load("make_results")


def _line(bench, params, metrics, command, time="2026-01-01T00:00:00Z", notes=""):
    return json.dumps({"bench": bench, "command": command, "time": time, "machine": {"processor": "x86_64", "cpus": 2},
                       "versions": {}, "params": params, "metrics": metrics, "notes": notes})


@pytest.fixture()
def fixture_results(tmp_path):
    lines = [
        _line("minhash/curate", {"n": 100}, {"docs_per_s": 111.0}, "python benchmarks/bench_minhash.py --quick"),
        _line("minhash/curate", {"n": 100}, {"docs_per_s": 222.0}, "python benchmarks/bench_minhash.py --quick",
              time="2026-01-02T00:00:00Z"),  # same params, later: replaces 111
        _line("minhash/curate", {"n": 5000}, {"docs_per_s": 333.0}, "python benchmarks/bench_minhash.py"),
        _line("selection_quality", {"method": "bids", "budget": 0.1},
              {"macro": 1.5, "macro_std": 0.25, "loss": {"gsm8k": 1.25, "mmlu": 2.0}}, "python benchmarks/selection_quality.py",
              notes="IFEval left out"),
        "{not json",
        json.dumps({"no_bench": 1}),
        json.dumps({"bench": "bids_prune", "command": "bench_bids.py --quick", "n": 20000, "speedup": 40.7}),
        json.dumps({"bench": "bids_prune", "command": "bench_bids.py --quick", "n": 20000, "speedup": 41.9}),
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("## Discussion\n\nPlanted-note-7731\n", encoding="utf-8")
    return tmp_path


def test_benchmarks_render_latest_per_params_with_commands(mr, fixture_results):
    out = fixture_results / "RESULTS.md"
    mr.main(["--results", str(fixture_results / "results.jsonl"), "--notes", str(fixture_results / "notes.md"),
             "--out", str(out)])
    text = out.read_text(encoding="utf-8")
    assert "222" in text and "111" not in text  # the later line of the same (bench, params) wins
    assert "333" in text  # other params: their own row
    assert "`python benchmarks/bench_minhash.py --quick`" in text and "`python benchmarks/bench_minhash.py`" in text
    assert "## minhash" in text and "## selection_quality" in text and "## bids_prune" in text
    # flat (older) lines: grouped by command, latest wins, command made runnable
    assert "41.9" in text and "40.7" not in text
    assert "`python benchmarks/bench_bids.py --quick`" in text
    # nested per-task metrics become columns, mean and std merge
    assert "loss.gsm8k" in text and "1.25" in text and "1.5 ± 0.25" in text
    assert "Note: IFEval left out" in text
    assert "2 malformed line(s)" in text
    assert text.rstrip().endswith("Planted-note-7731")
    assert not list(fixture_results.glob(".RESULTS.md.*"))  # atomic write leaves no temp file


def test_benchmarks_render_table_rows_match_inputs(mr):
    rows = [json.loads(_line("x/a", {"k": i}, {"v": float(i)}, f"python b.py --k {i}")) for i in range(3)]
    text = mr.render(rows)
    table = [ln for ln in text.splitlines() if ln.startswith("| x/a")]
    assert len(table) == 3
    assert [ln.split(" | ")[1] for ln in table] == ["0", "1", "2"]  # the varying param is a column
    # a parameter that is the same everywhere moves above the table
    rows2 = [json.loads(_line("y", {"fixed": 7, "k": i}, {"v": 1.0}, "c")) for i in range(2)]
    text2 = mr.render(rows2)
    assert 'Fixed parameters: `{"fixed": 7}`' in text2


def test_benchmarks_render_empty_and_missing(mr, tmp_path):
    out = tmp_path / "R.md"
    mr.main(["--results", str(tmp_path / "absent.jsonl"), "--notes", str(tmp_path / "absent.md"), "--out", str(out)])
    assert out.read_text(encoding="utf-8").startswith("# Benchmark results")


def test_benchmarks_run_commands_and_failures(tmp_path):
    run = _load("run")
    names = [s.name for s in run.scripts()]
    assert "targeted_selection.py" in names and all(n.endswith(".py") for n in names)
    ok = tmp_path / "ok.py"
    ok.write_text("print('fine')\n", encoding="utf-8")
    bad = tmp_path / "bad.py"
    bad.write_text("raise SystemExit(3)\n", encoding="utf-8")
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(60)\n", encoding="utf-8")
    st, rc, _, log = run.run_one([sys.executable, str(ok)], 60, tmp_path)
    assert (st, rc) == ("ok", 0) and "fine" in log.read_text()
    st, rc, _, _ = run.run_one([sys.executable, str(bad)], 60, tmp_path)
    assert (st, rc) == ("failed", 3)
    st, rc, _, _ = run.run_one([sys.executable, str(slow)], 1, tmp_path)
    assert (st, rc) == ("timeout", None)


def test_benchmarks_run_quick_flag_detection(tmp_path, monkeypatch):
    run = _load("run")
    monkeypatch.setattr(run, "HERE", tmp_path)
    with_q = tmp_path / "bench_a.py"
    with_q.write_text('p.add_argument("--quick", action="store_true")\n', encoding="utf-8")
    without = tmp_path / "bench_ches.py"
    without.write_text("p.add_argument('--n')\n", encoding="utf-8")
    plain = tmp_path / "bench_z.py"
    plain.write_text("pass\n", encoding="utf-8")
    def args(script, quick):
        argv = run.command(script, quick)
        return [Path(argv[1]).name, *argv[2:]]

    assert args(with_q, True) == ["bench_a.py", "--quick"]
    assert args(without, True) == ["bench_ches.py", *run.QUICK_ARGS["bench_ches.py"]]
    assert args(plain, True) == ["bench_z.py"]
    assert args(with_q, False) == ["bench_a.py"]
    assert [s.name for s in run.scripts()] == ["bench_a.py", "bench_ches.py", "bench_z.py"]
