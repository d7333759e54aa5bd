"""The judge client under endpoint faults, against the loopback fake server (never the network):
Retry-After, 200s that are not completions, the endpoint in the cache key, timeout/retries in the
CLI and recipes, a down endpoint and an annotation that labels nothing (exit 2, nothing written)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from curate.cli import main
from curate.selectors.critiq import judge as judge_mod
from curate.selectors.critiq.fakes import GuidedRule, synthetic_functions
from curate.selectors.critiq.judge import JudgeError, JudgeSession, OpenAICompatJudge, parse_worker, retry_after_s
from curate.selectors.critiq.server import BackendHTTPError, LocalServer
from curate.selectors.critiq.steps import CritiQAnnotate

MSG = [{"role": "user", "content": "hi"}]
GOOD = json.dumps({"thought": "t", "answer": "A"})


class Scripted:
    """Plays a list of actions: an exception to raise or a reply text; then GOOD."""

    def __init__(self, actions: list) -> None:
        self.actions = list(actions)
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, messages, params):
        with self.lock:
            self.calls += 1
            act = self.actions.pop(0) if self.actions else GOOD
        if isinstance(act, Exception):
            raise act
        return act


@pytest.fixture()
def sleeps(monkeypatch):
    """Record the client's back-off sleeps instead of sleeping (no timing in the assertions)."""
    seen: list[float] = []
    monkeypatch.setattr(OpenAICompatJudge, "sleep", staticmethod(seen.append))
    return seen


def _free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"  # nothing listens there once the socket is closed


def test_retry_after_is_honoured(sleeps) -> None:
    be = Scripted([BackendHTTPError(429, headers={"Retry-After": "7"}),
                   BackendHTTPError(503, headers={"Retry-After": "3"}), BackendHTTPError(500)])
    with LocalServer({"m": be}) as srv:
        j = OpenAICompatJudge(srv.url, "m", backoff_s=0.01, max_tries=4)
        assert j.chat(MSG, temperature=0, max_tokens=8, seed=0) == GOOD
    # the server's wait wins over the 0.01 s back-off; the plain 500 gets the exponential one
    assert sleeps == [7.0, 3.0, 0.04] and be.calls == 4


def test_retry_after_forms() -> None:
    assert retry_after_s("2.5") == 2.5 and retry_after_s(None) == 0.0 and retry_after_s("soon") == 0.0
    assert retry_after_s("-3") == 0.0 and retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert 50 < retry_after_s(__import__("email.utils").utils.formatdate(__import__("time").time() + 60,
                                                                        usegmt=True)) <= 60


@pytest.mark.parametrize("body", [b"", b"<html>bad gateway</html>", b'{"choices": []}', b'{"id": "x"}',
                                  b'{"choices": [{"message": {"content": null}}]}'])
def test_ok_status_without_a_completion_is_retried(body, sleeps) -> None:
    be = Scripted([BackendHTTPError(200, body=body)])
    with LocalServer({"m": be}) as srv:
        j = OpenAICompatJudge(srv.url, "m", backoff_s=0.01, max_tries=3)
        assert j.chat(MSG, temperature=0, max_tokens=8, seed=0) == GOOD
    assert be.calls == 2 and j.n_http_retries == 1
    be = Scripted([BackendHTTPError(200, body=body)] * 5)
    with LocalServer({"m": be}) as srv, pytest.raises(JudgeError, match="without a chat completion"):
        OpenAICompatJudge(srv.url, "m", backoff_s=0.01, max_tries=3).chat(MSG, temperature=0, max_tokens=8, seed=0)


def test_endpoint_url_is_in_the_cache_key(tmp_path, sleeps) -> None:
    """A reply cached from one endpoint must not answer for another endpoint with the same model."""
    cache = tmp_path / "judge.sqlite"
    with LocalServer({"m": Scripted([])}) as srv:
        live = JudgeSession(OpenAICompatJudge(srv.url, "m", backoff_s=0.01), cache)
        assert live.ask_json(MSG, parse_worker, temperature=0, max_tokens=8)[0].vote == "A"
        again = JudgeSession(OpenAICompatJudge(srv.url + "/", "m", backoff_s=0.01), cache)
        assert again.ask_json(MSG, parse_worker, temperature=0, max_tokens=8)[0].vote == "A"
        assert again.stats.n_fresh == 0  # the same endpoint (trailing slash aside) is served from cache
    dead_url = _free_port_url()
    dead = JudgeSession(OpenAICompatJudge(dead_url, "m", backoff_s=0.01, max_tries=2), cache)
    with pytest.raises(JudgeError, match=dead_url.replace(".", r"\.")):
        dead.ask_json(MSG, parse_worker, temperature=0, max_tokens=8)
    j = OpenAICompatJudge("http://user:sk-secret@127.0.0.1:9/v1?key=sk-secret", "m")
    assert j.name == "m@http://127.0.0.1:9/v1" and "sk-secret" not in j.name
    assert OpenAICompatJudge("http://127.0.0.1:9/v1", "m", endpoint="local-smollm").name == "m@local-smollm"


def _pool(tmp_path, n: int = 12) -> str:
    funcs, _ = synthetic_functions(n, seed=3)
    src = tmp_path / "pool.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Write function number {i}.", "input": "", "output": f}) + "\n"
                           for i, f in enumerate(funcs)))
    out = tmp_path / "pool.parquet"
    assert main(["ingest", str(src), "-o", str(out)]) == 0
    crit = tmp_path / "criteria.json"
    crit.write_text(json.dumps({"docs": "Prefer functions that have a docstring."}))
    return str(out)


def test_annotate_cli_down_endpoint_is_exit_2_naming_the_url(tmp_path, capsys, sleeps) -> None:
    pool = _pool(tmp_path)
    url = _free_port_url()
    out = tmp_path / "judged.parquet"
    rc = main(["critiq", "annotate", pool, "--criteria", str(tmp_path / "criteria.json"), "-o", str(out),
               "--judge-url", url, "--cache", str(tmp_path / "c.sqlite"), "--retries", "1", "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and url in err and "internal error" not in err and not out.exists()
    assert "after 2 tries" in err  # --retries 1 = two tries


def test_annotate_cli_labelling_nothing_is_exit_2(tmp_path, capsys) -> None:
    pool = _pool(tmp_path)
    out = tmp_path / "judged.parquet"

    def abstain(messages, params):
        return '{"answer": "None"}'

    with LocalServer({"m": abstain}) as srv:
        rc = main(["critiq", "annotate", pool, "--criteria", str(tmp_path / "criteria.json"), "-o", str(out),
                   "--judge-url", srv.url, "--judge-model", "m", "--cache", str(tmp_path / "c.sqlite"),
                   "--n-buckets", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "labelled 0 of 6 pairs" in err and not out.exists(), err


def test_timeout_and_retries_reach_the_client(tmp_path, monkeypatch) -> None:
    seen = {}
    real = judge_mod.OpenAICompatJudge

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(judge_mod, "OpenAICompatJudge", spy)
    pool = _pool(tmp_path, 4)
    with LocalServer({"m": GuidedRule()}) as srv:
        rc = main(["critiq", "annotate", pool, "--criteria", str(tmp_path / "criteria.json"),
                   "-o", str(tmp_path / "judged.parquet"), "--judge-url", srv.url, "--judge-model", "m",
                   "--cache", "", "--guided-choice", "--n-buckets", "1", "--timeout", "7.5", "--retries", "2"])
    assert rc in (0, 2) and seen["timeout_s"] == 7.5 and seen["max_tries"] == 3
    step = CritiQAnnotate(criteria="c.json", judge_url="http://127.0.0.1:1/v1", timeout=3, retries=0)
    seen.clear()
    step._session()
    assert seen["timeout_s"] == 3.0 and seen["max_tries"] == 1
    for bad in ({"timeout": 0}, {"timeout": float("inf")}, {"retries": -1}, {"retries": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CritiQAnnotate(criteria="c.json", judge_url="http://127.0.0.1:1/v1", **bad)
