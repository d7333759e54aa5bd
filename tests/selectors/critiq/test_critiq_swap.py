"""Swap mode: every pairwise judgment asked in both orders, only order-independent verdicts count.

A judge with a pure position bias (always "A") must abstain on every pair and be reported loudly;
a judge that answers by content must lose nothing. The two orders are separate cache entries."""

from __future__ import annotations

import json
import warnings

import polars as pl
import pytest

from curate.cli import main
from curate.selectors.critiq.annotate import annotate_pairs, check_labelled
from curate.selectors.critiq.fakes import (
    BackendJudge,
    ContentJudge,
    PositionJudge,
    ScriptedManager,
    synthetic_functions,
    synthetic_pairs,
)
from curate.selectors.critiq.flow import (
    Criterion,
    CritiQFlow,
    FlowConfig,
    Pair,
    judge_pairs,
    judge_single_prompt,
)
from curate.selectors.critiq.judge import JudgeError, JudgeSession, WorkerResult
from curate.selectors.critiq.server import LocalServer
from curate.selectors.critiq.steps import CritiQAnnotate, CritiQMine
from curate.selectors.critiq.swap import PositionLog, flip_vote, reconcile

CRITS = [Criterion("documented", "Prefer the function with a docstring."),
         Criterion("typed", "Prefer the function with type hint annotations.")]


def _pairs(n: int = 16) -> list[Pair]:
    funcs, q = synthetic_functions(60, seed=3)
    # the random pool pairing of annotate: which side is better is not fixed
    return [p.swapped() if k % 3 == 0 else p for k, p in enumerate(synthetic_pairs(funcs, q, n, seed=4))]


def _session(backend, cache=None) -> JudgeSession:
    return JudgeSession(BackendJudge(backend, type(backend).__name__), cache)


def _ok(v: str | None) -> WorkerResult:
    return WorkerResult(v, "ok" if v else "abstain", "", "")


def test_reconcile_maps_the_swapped_answer_back_before_comparing() -> None:
    assert [flip_vote(v) for v in ("A", "B", None)] == ["B", "A", None]
    assert reconcile(_ok("A"), _ok("B")).vote == "A"  # A on (x, y), B on (y, x): x both times
    assert reconcile(_ok("B"), _ok("A")).vote == "B"
    for first, second in (("A", "A"), ("B", "B"), ("A", None), (None, "B")):  # order-dependent → tie
        r = reconcile(_ok(first), _ok(second))
        assert (r.vote, r.status) == (None, "abstain") and "inconsistent" in r.thought
    assert reconcile(_ok(None), _ok(None)).status == "abstain"
    bad = WorkerResult(None, "invalid", "", "garbage")
    assert reconcile(_ok("A"), bad).status == "invalid" and reconcile(bad, _ok("B")).raw == "garbage"


def test_always_a_judge_abstains_on_every_pair_and_warns() -> None:
    pairs = _pairs()
    worker = _session(PositionJudge("A"))
    plain = judge_pairs(worker, CRITS, pairs)
    assert all(r.vote == "A" for rs in plain.values() for r in rs)  # without swap: 16 confident labels
    log = PositionLog(True, worker.name)
    res = judge_pairs(worker, CRITS, pairs, swap=True, log=log)
    assert all(r.status == "abstain" and r.vote is None for rs in res.values() for r in rs)
    rep = log.report()
    for name in ("documented", "typed"):
        row = rep["per_criterion"][name]
        assert row["n_calls"] == 2 * len(pairs) and row["position_bias_rate"] == 1.0
        assert row["consistency_rate"] == 0.0 and row["abstention_rate"] == 1.0
    assert rep["warnings"] and "POSITION BIAS" in rep["warnings"][0] and '"A" in 100.0%' in rep["warnings"][0]
    with pytest.warns(UserWarning, match="POSITION BIAS"):
        lab = annotate_pairs(pairs, CRITS, worker)  # swap is the default of annotate
    assert lab.height == 0
    with pytest.raises(JudgeError, match="labelled 0 of 16 pairs"):
        check_labelled(lab, worker, len(CRITS))
    # the single-prompt judge is forced to choose A or B, and still cannot hide the bias
    single = judge_single_prompt(worker, pairs, swap=True)
    assert all(r.status == "abstain" for r in single)


def test_bias_is_reported_without_swap_too() -> None:
    pairs = _pairs()
    worker = _session(PositionJudge("B"))
    with pytest.warns(UserWarning, match='answered "B" in 100.0%'):
        lab = annotate_pairs(pairs, CRITS, worker, swap=False)
    assert lab.height == len(pairs) and (lab["label"] == "B").all()
    log = PositionLog(False)
    judge_pairs(worker, CRITS, pairs, log=log)
    row = log.report()["overall"]
    assert row["position_bias_rate"] == 0.0 and row["same_letter_rate"] == 1.0 and row["consistency_rate"] is None


def test_content_judge_loses_nothing_to_swap_mode() -> None:
    pairs = _pairs()
    worker = _session(ContentJudge())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a content judge must not be called biased
        log = PositionLog(True)
        both = judge_pairs(worker, CRITS, pairs, swap=True, log=log)
        once = judge_pairs(worker, CRITS, pairs)
        assert {k: [(r.vote, r.status) for r in v] for k, v in both.items()} == \
            {k: [(r.vote, r.status) for r in v] for k, v in once.items()}
        assert any(r.vote for rs in both.values() for r in rs)
        overall = log.report()["overall"]
        assert overall["consistency_rate"] == 1.0 and overall["position_bias_rate"] == 0.5
        assert overall["abstention_rate"] == sum(r.status == "abstain" for rs in once.values() for r in rs) / (2 * 16)
        a = annotate_pairs(pairs, CRITS, worker, swap=True)
        b = annotate_pairs(pairs, CRITS, worker, swap=False)
        assert a.equals(b) and a.height > 0
        s1 = judge_single_prompt(worker, pairs, swap=True)
        s0 = judge_single_prompt(worker, pairs)
        assert [r.vote for r in s1] == [r.vote for r in s0] and all(r.vote for r in s1)


def test_two_orders_are_two_cache_entries(tmp_path) -> None:
    pairs = _pairs(6)
    backend = PositionJudge("A")
    cache = tmp_path / "judge.sqlite"
    worker = _session(backend, cache)
    judge_pairs(worker, CRITS, pairs, swap=True)
    assert backend.calls == 2 * 6 * 2 and len(worker.cache) == 2 * 6 * 2  # type: ignore[arg-type]
    again = _session(backend, cache)
    judge_pairs(again, CRITS, pairs)  # the given order is shared with a run without swap
    judge_pairs(again, CRITS, pairs, swap=True)
    assert backend.calls == 24 and again.stats.n_fresh == 0


def test_flow_with_swap_reports_and_rejects_a_position_biased_worker() -> None:
    funcs, q = synthetic_functions(60, seed=1)
    pairs = synthetic_pairs(funcs, q, 12, seed=1)
    worker, manager = _session(PositionJudge("A")), _session(ScriptedManager())
    logged: list[str] = []
    cfg = FlowConfig(n_criteria=3, epochs=1, swap=True, max_workers=2)
    with pytest.warns(UserWarning, match="POSITION BIAS"):
        res = CritiQFlow(worker, manager, cfg, log=logged.append).run(pairs)
    assert res.criteria == []  # no criterion "explains" the humans through a position
    bias = res.as_dict()["position_bias"]
    assert bias["swap"] is True and bias["warnings"] and any("POSITION BIAS" in m for m in logged)
    assert all(r["abstention_rate"] == 1.0 and r["position_bias_rate"] == 1.0 for r in bias["per_criterion"].values())
    assert res.config["swap"] is True
    # without swap the same judge agrees with the humans by chance only, and is still reported
    with pytest.warns(UserWarning, match="POSITION BIAS"):
        plain = CritiQFlow(worker, _session(ScriptedManager()), FlowConfig(n_criteria=3, epochs=1)).run(pairs)
    assert plain.position_bias["swap"] is False and plain.position_bias["warnings"]
    with pytest.raises(ValueError, match="swap"):
        FlowConfig(swap="yes")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:POSITION BIAS")  # the CLI's own stderr line is what is checked
def test_swap_parameters_of_steps_and_cli(tmp_path, capsys) -> None:
    assert CritiQAnnotate(criteria="c.json", judge_url="http://x/v1").swap is True
    assert CritiQMine(pairs="p.jsonl", judge_url="http://x/v1").swap is False
    for cls, kw in ((CritiQAnnotate, {"criteria": "c.json"}), (CritiQMine, {"pairs": "p.jsonl"})):
        with pytest.raises(ValueError, match="swap"):
            cls(judge_url="http://x/v1", swap="no", **kw)
    funcs, _ = synthetic_functions(24, seed=2)  # 12 pairs: enough letter answers to warn on
    pool = tmp_path / "pool.parquet"
    from curate.io.tables import read_table

    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Write function {i}.", "input": "", "output": f}) + "\n"
                           for i, f in enumerate(funcs)))
    read_table(str(src)).write_parquet(pool)
    (tmp_path / "criteria.json").write_text(json.dumps({"docs": "Prefer functions that have a docstring."}))
    out = tmp_path / "judged.parquet"
    args = ["critiq", "annotate", str(pool), "--criteria", str(tmp_path / "criteria.json"), "-o", str(out),
            "--cache", "", "--n-buckets", "1", "--json"]
    with LocalServer({"m": PositionJudge("A")}) as srv:
        rc = main([*args, "--judge-url", srv.url, "--judge-model", "m"])
        err = capsys.readouterr().err
        assert rc == 2 and "WARNING: POSITION BIAS" in err and not out.exists(), err
        rc = main([*args, "--judge-url", srv.url, "--judge-model", "m", "--no-swap"])
        cap = capsys.readouterr()
    assert rc == 0 and "WARNING: POSITION BIAS" in cap.err
    summary = json.loads(cap.out.strip().splitlines()[-1])
    pb = summary["position_bias"]
    assert pb["swap"] is False and pb["per_criterion"]["docs"]["position_bias_rate"] == 1.0 and pb["warnings"]
    assert (pl.read_parquet(out)["label"] == "A").all()
