"""The CritiQ recipe steps end to end: critiq_mine → critiq_annotate → embed → critiq, against the
real loopback server with the rule-based worker (guided replies) and the scripted manager."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from curate.errors import ParameterError
from curate.pipeline.recipe import parse_recipe
from curate.pipeline.runner import run_recipe
from curate.schema import texts
from curate.selectors.critiq.fakes import GuidedRule, ScriptedManager, synthetic_functions
from curate.selectors.critiq.server import LocalServer
from curate.selectors.critiq.steps import CritiQAnnotate, CritiQMine


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def code_task(tmp_path):
    """A pool of 60 synthetic functions (Alpaca JSONL), 30 human pairs of other functions (TRL JSONL,
    chosen = higher hidden quality), a two-criterion KB; returns (paths, hidden quality, pool ids)."""
    funcs, q = synthetic_functions(120, seed=1)
    pool = list(range(60))
    pool_file = _write_jsonl(tmp_path / "pool.jsonl",
                             [{"instruction": f"Write function number {i}.", "input": "", "output": funcs[i]} for i in pool])
    rng = np.random.default_rng(5)
    human = []
    while len(human) < 30:  # human pairs from functions outside the pool; chosen has the higher quality
        i, j = (int(x) + 60 for x in rng.choice(60, 2, replace=False))
        if abs(q[i] - q[j]) < 0.5:
            continue
        hi, lo = (i, j) if q[i] > q[j] else (j, i)
        human.append({"prompt": f"Write function number {hi}.", "chosen": funcs[hi], "rejected": funcs[lo]})
    pairs_file = _write_jsonl(tmp_path / "human.jsonl", human)
    kb_file = tmp_path / "kb.json"
    kb_file.write_text(json.dumps([{"name": "docs_kb", "description": "Prefer functions that have a docstring."},
                                   {"name": "speed_kb", "description": "Prefer faster code."}]))
    return {"pool": pool_file, "pairs": pairs_file, "kb": str(kb_file)}, q, pool


def _hidden_index(pool_file: str) -> dict[str, int]:
    """uid → function number of the pool rows (the hidden quality is indexed by it)."""
    from curate.io.tables import read_table

    src = read_table(pool_file)
    return {u: int(p.split("number ")[1].rstrip(".")) for u, p in zip(src["uid"].to_list(), texts(src, "prompt"),
                                                                      strict=True)}


def test_mine_annotate_score_recipe(tmp_path, code_task) -> None:
    files, q, pool = code_task
    crit, judged = tmp_path / "criteria.json", tmp_path / "pairs.parquet"
    rule = GuidedRule()
    with LocalServer({"rule": rule, "manager": ScriptedManager()}) as srv:
        judge = {"judge_url": srv.url, "judge_model": "rule", "guided_choice": True,
                 "cache": str(tmp_path / "judge.sqlite"), "concurrency": 2}
        raw = {
            "name": "critiq_steps", "seed": 0, "inputs": [files["pool"]], "output": str(tmp_path / "runs"),
            "steps": [
                {"use": "critiq_mine", "pairs": files["pairs"], "n_pairs": 24, "output": str(crit), "kb": files["kb"],
                 "manager_model": "manager", "epochs": 1, "n_criteria": 4, **judge},
                {"use": "critiq_annotate", "criteria": str(crit), "output": str(judged), "n_buckets": 1, **judge},
                {"use": "embed", "model": "hashing:512"},
                {"use": "critiq", "pairs": str(judged), "budget": 12, "temperature": 0.01,
                 "features": {"embed": "embed/prompt+response"}},
            ],
        }
        res = run_recipe(parse_recipe(raw, base=tmp_path), run_dir=tmp_path / "run")
        again = run_recipe(parse_recipe(raw, base=tmp_path), run_dir=tmp_path / "run")

    data = json.loads(crit.read_text())
    assert data["criteria"] and all(c["accuracy"] >= 0.75 for c in data["criteria"])
    assert any("docstring" in c["description"].lower() for c in data["criteria"])
    assert data["config"]["worker_guided_choice"] is True
    assert rule.choices_seen, "the worker was asked with guided_choice"
    # annotate asked both orders by default; its stats say how the judge behaved per criterion
    folder = next((tmp_path / "run" / "steps").glob("*-critiq_annotate"))
    bias = json.loads((folder / "stats.json").read_text())["critiq_annotate"]["position_bias"]
    assert bias["swap"] is True and bias["warnings"] == [] and set(bias["per_criterion"]) == {
        c["name"] for c in data["criteria"]}
    assert all(r["position_bias_rate"] is None or 0.1 <= r["position_bias_rate"] <= 0.9
               for r in bias["per_criterion"].values())
    mine = next((tmp_path / "run" / "steps").glob("*-critiq_mine"))
    assert json.loads((mine / "stats.json").read_text())["critiq_mine"]["position_bias"]["swap"] is False
    # agent labels follow the hidden quality
    lab = pl.read_parquet(judged)
    assert lab.height >= 10
    num = _hidden_index(files["pool"])
    agree = [q[num[w]] > q[num[lo]] for w, lo in zip(lab["winner_uid"].to_list(), lab["loser_uid"].to_list(), strict=True)]
    assert np.mean(agree) >= 0.9
    # the selection: 12 rows, clearly better than the pool on the hidden quality
    assert res.n_curated == 12 and res.n_rejected == 48
    cur = pl.read_parquet(tmp_path / "run" / "curated.parquet")
    assert np.mean([q[num[u]] for u in cur["uid"].to_list()]) > np.mean(q[pool]) + 0.5
    rej = pl.read_parquet(tmp_path / "run" / "rejected.parquet")
    assert rej.height == 48 and (rej["reason"].str.len_chars() > 0).all()
    # a rerun gives the same subset
    assert pl.read_parquet(again.run_dir / "curated.parquet")["uid"].to_list() == cur["uid"].to_list()


def test_step_parameters_validated_at_load() -> None:
    with pytest.raises(ParameterError, match="pairs"):
        CritiQMine(judge_url="http://x/v1")
    with pytest.raises(ParameterError, match="judge_url"):
        CritiQMine(pairs="p.jsonl", judge_url="localhost:8000")
    with pytest.raises(ParameterError, match="n_pairs"):
        CritiQMine(pairs="p.jsonl", judge_url="http://x/v1", n_pairs=0)
    with pytest.raises(ParameterError, match="criteria"):
        CritiQAnnotate(judge_url="http://x/v1")
    with pytest.raises(ParameterError, match="guided_choice"):
        CritiQAnnotate(criteria="c.json", judge_url="http://x/v1", guided_choice="yes")


def test_cli_mine_annotate_score(tmp_path, code_task) -> None:
    """The three verbs of the issue's CLI contract, chained through their files, with --json."""
    from click.testing import CliRunner

    from curate.cli import cli
    from curate.io.tables import read_table
    from curate.io.writers import write_parquet

    files, q, pool = code_task
    human_pq, pool_pq = tmp_path / "human.parquet", tmp_path / "pool.parquet"
    write_parquet(read_table(files["pairs"]), human_pq)
    write_parquet(read_table(files["pool"]), pool_pq)
    crit, judged, out = tmp_path / "c.json", tmp_path / "judged.parquet", tmp_path / "out"
    runner = CliRunner()
    with LocalServer({"rule": GuidedRule(), "manager": ScriptedManager()}) as srv:
        common = ["--judge-url", srv.url, "--judge-model", "rule", "--cache", str(tmp_path / "j.sqlite"), "--json"]
        r = runner.invoke(cli, ["critiq", "mine", str(human_pq), "-o", str(crit), "--manager-model", "manager",
                                "--kb", files["kb"], "--epochs", "1", "--n-criteria", "4", "--guided-choice", *common])
        assert r.exit_code == 0, r.output
        mined = json.loads(r.output.strip().splitlines()[-1])
        assert mined["n_pairs"] == 30 and mined["criteria"] and crit.exists()
        r = runner.invoke(cli, ["critiq", "annotate", str(pool_pq), "--criteria", str(crit), "-o", str(judged),
                                "--n-buckets", "1", "--guided-choice", *common])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output.strip().splitlines()[-1])["n_labelled"] == pl.read_parquet(judged).height > 0
    r = runner.invoke(cli, ["critiq", "score", str(pool_pq), "--pairs", str(judged), "-o", str(out), "--budget", "12",
                            "--temperature", "0.01", "--embed-model", "hashing:512", "--field", "response", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["n_kept"] == 12 and summary["field"] == "response"
    num = _hidden_index(files["pool"])
    sel = pl.read_parquet(out / "curated.parquet")
    assert sel.height == 12 and pl.read_parquet(out / "rejected.parquet").height == 48
    assert np.mean([q[num[u]] for u in sel["uid"].to_list()]) > np.mean(q[pool]) + 0.5
