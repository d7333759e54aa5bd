"""The HTML report of real run folders: sections, funnel numbers, escaping, CLI, edge cases."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import curate.features.embed  # noqa: F401 - registers the `embed` step (curate.features does not import it yet)
from curate.pipeline.recipe import parse_recipe
from curate.pipeline.runner import run_recipe
from curate.report import build_report, write_report
from curate.schema import make_record, to_frame

EVIL = "<script>alert('pwn')</script> & \"quotes\""
ALL_SECTIONS = ["overview", "funnel", "lengths", "scores", "clusters", "composition", "embedding", "samples"]


def _jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run: 20 distinct rows, one pair repeated 3 times (a planted exact-dup cluster of
    size 3), a refusal whose text carries HTML, a too-short prompt, a malformed line, 2 targets."""
    d = tmp_path_factory.mktemp("report_run")
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    rows: list[dict | str] = [
        {"instruction": f"Explain {words[i % 12]} and {words[(i * 5) % 12]} in {i + 3} sentences please",
         "input": "", "output": " ".join(words[(i + j) % 12] for j in range(8 + i))} for i in range(20)]
    rows += [{"instruction": "Name three planets of the solar system", "input": "", "output": "Mars, Venus, Earth"}] * 3
    rows.append({"instruction": f"Describe this: {EVIL}", "input": "",
                 "output": f"As an AI language model I cannot {EVIL}"})
    rows.append({"instruction": "hi", "input": "", "output": "Hello! How can I help?"})
    rows.append("{this line is not json <b>")
    pool = _jsonl(d / "pool.jsonl", rows)
    targets = _jsonl(d / "gsm8k.jsonl", [{"question": "What is 2+2?", "answer": "#### 4"},
                                          {"question": "What is 3+5?", "answer": "#### 8"}])
    recipe = parse_recipe({
        "name": "report-test", "seed": 0, "inputs": [str(pool)], "targets": [{"path": str(targets), "kind": "target"}],
        "output": str(d / "runs"), "on_error": "skip",
        "steps": [{"use": "filter"}, {"use": "exact_dedup"}, {"use": "embed", "model": "hashing:32"},
                  {"use": "random", "budget": 10}],
    })
    res = run_recipe(recipe, run_dir=d / "run")
    return res.run_dir


def test_runner_writes_report_with_every_section(run_dir: Path) -> None:
    out = run_dir / "report.html"
    assert out.exists(), "the runner should call write_report at the end of the run"
    text = out.read_text(encoding="utf-8")
    for key in ALL_SECTIONS:
        assert f'id="sec-{key}"' in text, key
    assert text.count("data:image/png;base64,") >= 7
    assert "<script" not in text.lower()  # static: no scripts, and data never injects one
    assert not list(run_dir.glob(".*.tmp"))


def test_funnel_numbers_equal_manifest(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    funnel = text.split('id="sec-funnel"')[1].split("</section>")[0]
    rows = re.findall(r'<span class="step">(.*?)</span>.*?<span class="n-in">(\d+)</span>.*?'
                      r'<span class="n-out">(\d+)</span>.*?<span class="n-drop">(\d+)</span>', funnel)
    assert [(html.unescape(s), int(a), int(b), int(c)) for s, a, b, c in rows] == [
        (s["step"], s["rows_in"], s["rows_out"], s["rows_in"] - s["rows_out"]) for s in manifest["steps"]]
    # the planted drops: one too-short prompt, one refusal; two exact copies; the budget of 10
    steps = {s["step"]: s for s in manifest["steps"]}
    assert steps["filter"]["rows_in"] - steps["filter"]["rows_out"] == 2
    assert steps["exact_dedup"]["rows_in"] - steps["exact_dedup"]["rows_out"] == 2
    assert steps["random"]["rows_out"] == 10
    for s in manifest["steps"]:
        for reason, n in s["dropped"].items():
            assert f"{n} &times; {html.escape(reason)}" in funnel


def test_data_text_is_escaped(run_dir: Path) -> None:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert EVIL not in text and "<script>alert" not in text
    assert html.escape(EVIL) in text  # the refusal's sample row, escaped
    assert "{this line is not json &lt;b&gt;" in text  # the malformed source line, escaped
    samples = text.split('id="sec-samples"')[1]
    assert "filter: refusal" in samples and "ingest: " in samples


def test_planted_cluster_and_composition(run_dir: Path) -> None:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    clusters = text.split('id="sec-clusters"')[1].split("</section>")[0]
    assert "<b>size 3</b>" in clusters
    assert clusters.count('<li class="kept">') == 1 and clusters.count('<li class="dropped">') == 2
    assert "Name three planets of the solar system" in clusters
    comp = text.split('id="sec-composition"')[1].split("</section>")[0]
    assert "by task" in comp and "gsm8k" in comp and "pool.jsonl" in comp
    emb = text.split('id="sec-embedding"')[1].split("</section>")[0]
    assert "embed/prompt+response" in emb and "PCA" in emb


def test_cli_report_json_last_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from curate.cli import main

    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(run_dir), "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out.read_bytes() == (run_dir / "report.html").read_bytes()  # deterministic: same run, same bytes
    assert summary["command"] == "report" and summary["output"] == str(out)
    assert summary["sections"] == ALL_SECTIONS
    assert summary["bytes"] == out.stat().st_size and summary["rows"]["curated"] == 10
    assert main(["report", str(tmp_path)]) == 2  # not a run folder: a clear error, exit 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and not (tmp_path / "report.html").exists()


def _bare_run(d: Path, steps: list[dict], curated: pl.DataFrame, rejected: pl.DataFrame) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    curated.write_parquet(d / "curated.parquet")
    rejected.write_parquet(d / "rejected.parquet")
    manifest = {"recipe": {"name": "bare"}, "steps": steps,
                "rows": {"input": curated.height + rejected.height, "curated": curated.height, "rejected": rejected.height}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_run_without_steps_features_or_targets(tmp_path: Path) -> None:
    table = to_frame([make_record("sft", messages=[{"role": "user", "content": f"q{i}"},
                                                   {"role": "assistant", "content": "a" * i}]) for i in range(1, 4)])
    run = _bare_run(tmp_path / "run", [{"step": "ingest", "use": "ingest", "rows_in": 3, "rows_out": 3, "dropped": {}}],
                    table, table.head(0))
    out = write_report(run, tmp_path / "r.html")
    rep = build_report(run)
    assert rep.sections == ["overview", "funnel", "lengths", "composition"]
    text = out.read_text()
    assert "sec-scores" not in text and "sec-embedding" not in text and "sec-samples" not in text


def test_empty_run(tmp_path: Path) -> None:
    empty = to_frame([])
    run = _bare_run(tmp_path / "run", [], empty, empty)
    rep = build_report(run)
    assert rep.sections == ["overview"]
    assert "<html" in rep.html


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _screenshot(url: str, png: Path, profile: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,2000", url]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert png.exists(), f"chromium wrote no screenshot: {' '.join(cmd)}"
    return mpimg.imread(png)[..., :3].astype(np.float64)


@pytest.mark.skipif(CHROMIUM is None, reason="headless chromium not installed (apt-get install -y chromium)")
def test_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = _screenshot((run_dir / "report.html").resolve().as_uri(), tmp_path / "report.png", tmp_path / "profile")
    blank_html = tmp_path / "blank.html"
    blank_html.write_text("<!DOCTYPE html><html><body></body></html>")
    blank = _screenshot(blank_html.as_uri(), tmp_path / "blank.png", tmp_path / "profile")
    assert page.shape[:2] == (2000, 1200)
    assert blank.var() < 1e-6  # the reference: an empty page is one colour
    assert page.var() > 0.01, "the report screenshot is (nearly) blank"
    # plots rendered: the kept/dropped colours of the figures are on screen
    kept = np.abs(page - np.array([0x2B, 0x7B, 0xBA]) / 255).sum(-1) < 0.05
    dropped = np.abs(page - np.array([0xD9, 0x5F, 0x02]) / 255).sum(-1) < 0.05
    assert kept.sum() > 1000 and dropped.sum() > 100
