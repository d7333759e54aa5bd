"""CritiQ Flow against the real loopback HTTP server with a rule-based worker and a scripted manager."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curate.selectors.critiq.fakes import (
    BackendJudge,
    RuleJudge,
    ScriptedManager,
    synthetic_functions,
    synthetic_pairs,
)
from curate.selectors.critiq.flow import (
    Criterion,
    CritiQFlow,
    FlowConfig,
    Pair,
    criterion_accuracy,
    majority_vote,
    prediction_accuracy,
    swap_pairs,
    triage,
    update_best,
    vote_accuracy,
)
from curate.selectors.critiq.judge import (
    BudgetExceeded,
    CacheMiss,
    JudgeSession,
    OpenAICompatJudge,
    WorkerResult,
)
from curate.selectors.critiq.server import LocalServer

KB = [("docs_kb", "Prefer functions that have a docstring."), ("readability", "Prefer readable code."),
      ("speed_kb", "Prefer faster code.")]
OK_A, OK_B = WorkerResult("A", "ok"), WorkerResult("B", "ok")
ABST, INV = WorkerResult(None, "abstain"), WorkerResult(None, "invalid")


def _pairs(answers: str) -> list[Pair]:
    return [Pair(f"a{i}", f"b{i}", "x", "y", a) for i, a in enumerate(answers)]


def test_triage_boundaries_exact() -> None:
    assert triage(0.75) == "good"
    assert triage(0.5) == "low"
    assert triage(0.7499) == "mid"
    assert triage(0.5001) == "mid"
    assert triage(3 / 4) == "good" and triage(2 / 4) == "low"


def test_accuracy_excludes_abstentions_keeps_invalid() -> None:
    pairs = _pairs("AABBA")
    # correct, abstain, correct, invalid (wrong), wrong
    acc, flag = criterion_accuracy([OK_A, ABST, OK_B, INV, OK_B], pairs)
    assert acc == pytest.approx(2 / 4) and not flag
    acc, flag = criterion_accuracy([ABST] * 5, pairs)
    assert acc == 0.0 and flag


def test_vote_ties_are_none_and_wrong() -> None:
    assert majority_vote([OK_A, OK_B, ABST, INV]) is None
    assert majority_vote([OK_A, OK_A, OK_B]) == "A"
    assert majority_vote([OK_A, OK_A, OK_B], threshold=1) is None
    pairs = _pairs("AB")
    res = {"c1": [OK_A, OK_A], "c2": [OK_B, OK_A]}  # pair0 tie -> wrong, pair1 A vs answer B -> wrong
    assert vote_accuracy(res, pairs) == 0.0
    res = {"c1": [OK_A, OK_B], "c2": [ABST, OK_B]}
    assert vote_accuracy(res, pairs) == 1.0


def test_best_keeps_highest_and_earlier_on_ties() -> None:
    best: dict[str, Criterion] = {}
    update_best(best, Criterion("c", "v0", 0, 0.6))
    update_best(best, Criterion("c", "v1", 1, 0.6))
    assert best["c"].version == 0
    update_best(best, Criterion("c", "v2", 2, 0.7))
    update_best(best, Criterion("c", "v3", 3, 0.65))
    assert best["c"].description == "v2"


def test_swap_is_seeded_and_balanced() -> None:
    pairs = _pairs("A" * 200)
    s1, s2 = swap_pairs(pairs, 3), swap_pairs(pairs, 3)
    assert s1 == s2
    n_b = sum(p.answer == "B" for p in s1)
    assert 70 < n_b < 130
    for p, q in zip(pairs, s1, strict=True):
        assert (q.text_a, q.answer) in ((p.text_a, "A"), (p.text_b, "B"))


@pytest.fixture(scope="module")
def task() -> list[Pair]:
    texts, q = synthetic_functions(200, seed=0)
    return synthetic_pairs(texts, q, n_pairs=30, seed=0)


def _run(url: str, cache, mode: str, manager: ScriptedManager, task, **cfg):
    # each LocalServer gets a free port; naming the endpoint lets a restarted server share the cache
    kw = {"backoff_s": 0.01, "endpoint": "loopback-fakes"}
    worker = JudgeSession(OpenAICompatJudge(url, "rule", max_concurrency=4, **kw), cache, cache_mode=mode)
    mgr = JudgeSession(OpenAICompatJudge(url, "manager", max_concurrency=1, **kw), cache, cache_mode=mode)
    flow = CritiQFlow(worker, mgr, FlowConfig(**{"n_criteria": 6, "epochs": 2, **cfg}), kb=KB)
    return flow.run(task), worker, mgr


@pytest.fixture(scope="module")
def http_run(tmp_path_factory, task):
    tmp_path = tmp_path_factory.mktemp("flow")
    manager = ScriptedManager()
    with LocalServer({"rule": RuleJudge(), "manager": manager}) as srv:
        res, _worker, _mgr = _run(srv.url, tmp_path / "c.sqlite", "read_write", manager, task)
    return res, manager, tmp_path


def test_flow_over_http_end_to_end(http_run, task) -> None:
    res, manager, tmp_path = http_run
    hist = {h["phase"]: h for h in res.history}
    n, n_kb = len(task), len(KB)
    # KB retrieval: > 0.5, sorted by (-acc, name)
    kb_acc = hist["kb_retrieval"]["accuracy"]
    want = sorted([k for k, a in kb_acc.items() if a > 0.5], key=lambda k: (-kb_acc[k], k))
    assert hist["kb_retrieval"]["retrieved"] == want
    # triage in history consistent with thresholds; banned names never come back
    banned: set[str] = set()
    for e in ("epoch_1", "epoch_2"):
        for c in hist[e]["criteria"]:
            assert c["triage"] == triage(c["accuracy"])
            assert c["name"].casefold() not in banned
        banned |= {c["name"].casefold() for c in hist[e]["criteria"] if c["triage"] == "low"}
        assert all(name.casefold() not in banned for name in hist[e]["new"])
    assert banned, "the synthetic task should produce low criteria"
    # the scripted manager re-proposed a banned/current name every time: it was rejected
    assert manager.proposed[0] not in [c["name"] for c in hist["final"]["criteria"] if c["name"] != manager.proposed[0]]
    upper = manager.proposed[0].upper()
    for h in res.history:
        for c in h.get("criteria", []):
            assert c["name"] != upper
    # reflections carry the real description, never "None"
    reflects = [p for p in manager.prompts if "TASK: reflect" in p]
    assert reflects
    for p in reflects:
        desc = p.split("[Criterion description]\n", 1)[1].split("\n\n", 1)[0]
        assert desc and desc != "None"
    # final: best versions >= 0.75, sorted; includes a docstring criterion
    accs = [c.accuracy for c in res.criteria]
    assert all(a >= 0.75 for a in accs) and accs == sorted(accs, reverse=True)
    for c in res.criteria:
        assert res.best[c.name].accuracy == c.accuracy
    assert any("docstring" in c.description.lower() for c in res.criteria)
    # voting vs single criteria, both counting abstentions as wrong (coverage-aware)
    e2 = hist["epoch_2"]
    assert e2["vote_accuracy"] >= np.mean([c["accuracy"] for c in hist["epoch_1"]["criteria"]])
    # call counts follow the §5 formulas (first attempts, fresh + cached)
    w = res.calls["worker"]
    assert w["kb_retrieval"]["first"] == n_kb * n
    assert w["epoch_1"]["first"] == 6 * n and w["final"]["first"] == len(hist["final"]["criteria"]) * n
    m = res.calls["manager"]
    assert m["warmup"]["first"] == n + 1
    mids = [c for c in hist["epoch_1"]["criteria"] if c["triage"] == "mid"]
    lows = [c for c in hist["epoch_1"]["criteria"] if c["triage"] == "low"]
    assert m["epoch_1_manager"]["first"] >= len(mids) + (1 if lows else 0)
    # rerun in read_only mode: zero fresh calls, byte-identical criteria
    with LocalServer({"rule": RuleJudge(), "manager": ScriptedManager()}) as srv:
        res2, worker2, mgr2 = _run(srv.url, tmp_path / "c.sqlite", "read_only", ScriptedManager(), task)
    assert worker2.stats.n_fresh == 0 and mgr2.stats.n_fresh == 0
    assert res2.criteria_json() == res.criteria_json()
    out = res.save(tmp_path / "criteria.json")
    data = json.loads(out.read_text())
    assert data["criteria"] and data["history"][-1]["phase"] == "final"


def test_read_only_cache_miss_raises(tmp_path, task) -> None:
    worker = JudgeSession(BackendJudge(RuleJudge(), "rule"), tmp_path / "x.sqlite", cache_mode="read_only")
    mgr = JudgeSession(BackendJudge(ScriptedManager(), "m"), tmp_path / "x.sqlite", cache_mode="read_only")
    with pytest.raises(CacheMiss):
        CritiQFlow(worker, mgr, FlowConfig(n_criteria=3, epochs=1), kb=KB).run(task)


def test_budget_exceeded_before_phase(tmp_path, task) -> None:
    rule = BackendJudge(RuleJudge(), "rule")
    worker = JudgeSession(rule, tmp_path / "b.sqlite")
    mgr = JudgeSession(BackendJudge(ScriptedManager(), "m"), tmp_path / "b.sqlite")
    cfg = FlowConfig(n_criteria=6, epochs=1, max_llm_calls=len(KB) * len(task) + 5)
    with pytest.raises(BudgetExceeded, match="warmup"):
        CritiQFlow(worker, mgr, cfg, kb=KB).run(task)
    assert rule.n_calls == len(KB) * len(task)  # the KB phase ran, the warm-up never started


def test_flow_in_process_matches_http(http_run, task) -> None:
    """Same judges in-process and over HTTP give the same criteria (transport invariance), and
    the final majority vote beats the mean single criterion used alone (abstention = wrong)."""
    w = JudgeSession(BackendJudge(RuleJudge(), "rule"))
    m = JudgeSession(BackendJudge(ScriptedManager(), "manager"))
    a = CritiQFlow(w, m, FlowConfig(n_criteria=6, epochs=2), kb=KB).run(task)
    assert a.criteria_json() == http_run[0].criteria_json()
    from curate.selectors.critiq.flow import judge_pairs
    from curate.selectors.critiq.flow import swap_pairs as sw

    pairs = sw(task, 0)
    res = judge_pairs(w, a.criteria, pairs)
    singles = [prediction_accuracy(r, pairs) for r in res.values()]
    assert vote_accuracy(res, pairs) >= np.mean(singles)


def test_flow_config_validation() -> None:
    from curate.errors import ParameterError

    for bad in ({"n_criteria": 0}, {"thresholds": (0.8, 0.5)}, {"epochs": -1}, {"max_llm_calls": 0}):
        with pytest.raises(ParameterError, match="parameter of CritiQFlow must be"):
            FlowConfig(**bad)


def test_propose_reask_rounds_resample_a_seeded_manager(tmp_path) -> None:
    """Re-asking for missing criteria with an unchanged prompt must not replay round 0's reply."""
    texts, q = synthetic_functions(40, seed=0)
    pairs = synthetic_pairs(texts, q, n_pairs=6, seed=0)
    seeds = []

    def manager(messages, params):
        if "TASK: propose" not in messages[-1]["content"]:
            return "The better text has a docstring."
        seeds.append(params["seed"])
        return "I cannot." if params["seed"] == 0 else json.dumps({"docstrings": "Prefer functions with a docstring."})

    worker = JudgeSession(BackendJudge(RuleJudge(), "rule"), tmp_path / "c.sqlite")
    mgr = JudgeSession(BackendJudge(manager, "mgr"), tmp_path / "c.sqlite", max_retries=0)
    res = CritiQFlow(worker, mgr, FlowConfig(n_criteria=1, epochs=0, max_retries=1, seed=0), kb=[]).run(pairs)
    assert seeds == [0, 1]
    assert {h["phase"]: h for h in res.history}["warmup"]["proposed"] == ["docstrings"]
