"""OpenAICompatJudge, cache and re-asks against the real loopback server with injected faults."""

from __future__ import annotations

import json
import threading
import time

import pytest

from curate.selectors.critiq.fakes import BackendJudge, RuleJudge, ScriptedManager, synthetic_functions, synthetic_pairs
from curate.selectors.critiq.flow import CritiQFlow, FlowConfig
from curate.selectors.critiq.judge import (
    JudgeError,
    JudgeParseError,
    JudgeSession,
    OpenAICompatJudge,
    cache_key,
    extract_json,
    parse_criteria,
    parse_worker,
)
from curate.selectors.critiq.server import BackendHTTPError, LocalServer

MSG = [{"role": "user", "content": "hi"}]
GOOD = json.dumps({"analysis_a": "", "analysis_b": "", "thought": "t", "answer": "A"})


class Scripted:
    """Backend that plays a list of actions: a status code, 'sleep', 'bad' or a reply text."""

    def __init__(self, actions: list) -> None:
        self.actions = list(actions)
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, messages, params):
        with self.lock:
            self.calls += 1
            act = self.actions.pop(0) if self.actions else GOOD
        if isinstance(act, int):
            raise BackendHTTPError(act)
        if act == "sleep":
            time.sleep(1.0)
            return GOOD
        return act


def _judge(url: str, **kw) -> OpenAICompatJudge:
    return OpenAICompatJudge(url, "m", backoff_s=0.01, **{"max_tries": 4, **kw})


def test_parsing_rules() -> None:
    assert extract_json('noise {"a": {"b": 1}} tail')["a"] == {"b": 1}
    with pytest.raises(JudgeParseError):
        extract_json("no braces")
    assert parse_worker('{"answer": "none of them"}').status == "abstain"
    assert parse_worker('{"answer": "b", "thought": "x"}').vote == "B"
    with pytest.raises(JudgeParseError):
        parse_worker('{"answer": "C"}')
    with pytest.raises(JudgeParseError):
        parse_criteria(json.dumps({"x" * 81: "d"}))
    with pytest.raises(JudgeParseError):
        parse_criteria(json.dumps({"x": ""}))


def test_retry_429_then_200_and_5xx(monkeypatch) -> None:
    be = Scripted([429, 500, 503])
    with LocalServer({"m": be}) as srv:
        j = _judge(srv.url)
        assert j.chat(MSG, temperature=0, max_tokens=8, seed=0) == GOOD
    assert be.calls == 4 and j.n_http_retries == 3


def test_persistent_errors_and_timeouts_give_clear_error() -> None:
    be = Scripted([500] * 10)
    with LocalServer({"m": be}) as srv:
        with pytest.raises(JudgeError, match="after 4 tries; last: HTTP 500"):
            _judge(srv.url).chat(MSG, temperature=0, max_tokens=8, seed=0)
        be2 = Scripted(["sleep", GOOD])
        srv.backends  # noqa: B018
    with LocalServer({"m": be2}) as srv:
        assert _judge(srv.url, timeout_s=0.3).chat(MSG, temperature=0, max_tokens=8, seed=0) == GOOD
        be3 = Scripted(["sleep"] * 3)
    with LocalServer({"m": be3}) as srv, pytest.raises(JudgeError, match="timeout"):
        _judge(srv.url, timeout_s=0.2, max_tries=2).chat(MSG, temperature=0, max_tokens=8, seed=0)


def test_client_error_not_retried() -> None:
    be = Scripted([400])
    with LocalServer({"m": be}) as srv, pytest.raises(JudgeError, match="HTTP 400"):
        _judge(srv.url).chat(MSG, temperature=0, max_tokens=8, seed=0)
    assert be.calls == 1


def test_bad_json_reasked_three_times_then_invalid(tmp_path) -> None:
    be = Scripted(["nope", "{bad json", '{"answer": "Z"}', "still nothing", GOOD])
    with LocalServer({"m": be}) as srv:
        s = JudgeSession(_judge(srv.url), tmp_path / "c.sqlite")
        parsed, raw = s.ask_json(MSG, parse_worker, temperature=0, max_tokens=8)
    assert parsed is None and raw == "still nothing" and be.calls == 4
    assert s.stats.retried[""] == 3
    be = Scripted(["nope", GOOD])
    with LocalServer({"m": be}) as srv:
        s = JudgeSession(_judge(srv.url), None)
        parsed, _ = s.ask_json(MSG, parse_worker, temperature=0, max_tokens=8)
    assert parsed.vote == "A" and be.calls == 2


def test_reask_sends_a_new_seed_so_a_seeded_sampler_resamples(tmp_path) -> None:
    """A seeded sampler (``curate judge serve``, vLLM) replays a reply for the same seed; a re-ask
    must send another seed, else it only repeats the parse failure (seen with SmolLM2 on PandaLM)."""
    seen = []

    def seeded(messages, params):
        seen.append(params["seed"])
        return "no json here" if params["seed"] == 7 else GOOD

    s = JudgeSession(BackendJudge(seeded, "m"), tmp_path / "c.sqlite", max_retries=2)
    parsed, _ = s.ask_json(MSG, parse_worker, temperature=1.0, max_tokens=8, seed=7)
    assert parsed is not None and parsed.vote == "A"
    assert seen == [7, 8]  # the first attempt keeps the caller's seed (its cache key is unchanged)


def test_cache_key_and_secret_never_stored(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CURATE_TEST_KEY", "sk-secret-123")
    seen = {}

    def backend(messages, params):
        return GOOD

    with LocalServer({"m": backend}) as srv:
        j = OpenAICompatJudge(srv.url, "m", api_key_env="CURATE_TEST_KEY")
        s = JudgeSession(j, tmp_path / "c.sqlite")
        s.chat(MSG, temperature=0, max_tokens=8)
        s.chat(MSG, temperature=0, max_tokens=8)
        seen["fresh"], seen["cached"] = s.stats.fresh[""], s.stats.cached[""]
    assert seen == {"fresh": 1, "cached": 1}
    assert "sk-secret" not in repr(j) and "sk-secret" not in j.name
    s.cache.close()
    for f in tmp_path.iterdir():
        assert b"sk-secret" not in f.read_bytes()
    k = cache_key("m", MSG, temperature=0, max_tokens=8, seed=0, attempt=0)
    assert k != cache_key("m", MSG, temperature=0, max_tokens=8, seed=0, attempt=1)
    assert k != cache_key("m2", MSG, temperature=0, max_tokens=8, seed=0, attempt=0)
    assert k == cache_key("m", [dict(MSG[0])], temperature=0.0, max_tokens=8, seed=0, attempt=0)


def test_server_dies_mid_run_then_rerun_completes(tmp_path) -> None:
    texts, q = synthetic_functions(60, seed=1)
    pairs = synthetic_pairs(texts, q, n_pairs=10, seed=1)
    kb = [("docs", "Prefer functions with a docstring."), ("style", "Prefer readable code.")]
    rule = RuleJudge()
    counter = {"n": 0}
    srv = LocalServer({"rule": None, "manager": ScriptedManager()})  # placeholder, replaced below

    def dying(messages, params):
        counter["n"] += 1
        if counter["n"] == 12:
            threading.Thread(target=srv.stop, daemon=True).start()
        return rule(messages, params)

    srv.backends["rule"] = dying
    srv.start()
    url = srv.url
    port = srv.port
    cache = tmp_path / "c.sqlite"

    def sessions(u):
        return (JudgeSession(OpenAICompatJudge(u, "rule", max_concurrency=1, max_tries=3, backoff_s=0.01), cache),
                JudgeSession(OpenAICompatJudge(u, "manager", max_concurrency=1, max_tries=3, backoff_s=0.01), cache))

    w, m = sessions(url)
    with pytest.raises(JudgeError, match="no answer"):
        CritiQFlow(w, m, FlowConfig(n_criteria=3, epochs=1, max_workers=1), kb=kb).run(pairs)
    srv.stop()
    finished = w.stats.fresh["kb_retrieval"]
    assert finished >= 11
    assert len(w.cache) == finished  # every finished call is in the cache
    with LocalServer({"rule": rule, "manager": ScriptedManager()}, port=port) as srv2:
        w2, m2 = sessions(srv2.url)
        res = CritiQFlow(w2, m2, FlowConfig(n_criteria=3, epochs=1, max_workers=1), kb=kb).run(pairs)
    assert w2.stats.cached["kb_retrieval"] == finished
    assert w2.stats.fresh["kb_retrieval"] == len(kb) * len(pairs) - finished
    assert res.history[-1]["phase"] == "final"
