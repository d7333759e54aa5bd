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


def test_mine_annotate_score_recipe(tmp_path) -> None:
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
    crit, judged = tmp_path / "criteria.json", tmp_path / "pairs.parquet"
    rule = GuidedRule()
    with LocalServer({"rule": rule, "manager": ScriptedManager()}) as srv:
        judge = {"judge_url": srv.url, "judge_model": "rule", "guided_choice": True,
                 "cache": str(tmp_path / "judge.sqlite"), "concurrency": 2}
        raw = {
            "name": "critiq_steps", "seed": 0, "inputs": [pool_file], "output": str(tmp_path / "runs"),
            "steps": [
                {"use": "critiq_mine", "pairs": pairs_file, "n_pairs": 24, "output": str(crit), "kb": str(kb_file),
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
    names = [c["name"] for c in data["criteria"]]
    assert names and all(c["accuracy"] >= 0.75 for c in data["criteria"])
    assert any("docstring" in c["description"].lower() for c in data["criteria"])
    assert data["config"]["worker_guided_choice"] is True
    assert rule.choices_seen, "the worker was asked with guided_choice"
    # agent labels follow the hidden quality on pairs whose docstring/hints differ
    lab = pl.read_parquet(judged)
    assert lab.height >= 10
    from curate.io.tables import read_table

    src = read_table(pool_file)
    num = {u: int(p.split("number ")[1].rstrip(".")) for u, p in zip(src["uid"].to_list(), texts(src, "prompt"),
                                                                      strict=True)}
    agree = [q[num[w]] > q[num[lo]] for w, lo in zip(lab["winner_uid"].to_list(), lab["loser_uid"].to_list(), strict=True)]
    assert np.mean(agree) >= 0.9
    # the selection: 12 rows, clearly better than the pool on the hidden quality
    assert res.n_curated == 12 and res.n_rejected == 48
    cur = pl.read_parquet(tmp_path / "run" / "curated.parquet")
    chosen_q = np.mean([q[num[u]] for u in cur["uid"].to_list()])
    assert chosen_q > np.mean(q[pool]) + 0.5
    rej = pl.read_parquet(tmp_path / "run" / "rejected.parquet")
    assert rej.height == 48 and (rej["reason"].str.len_chars() > 0).all()
    # a rerun skips every step and gives the same subset
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
