"""The forms of a constrained-choice request (``structured_outputs``, ``guided_choice``,
``response_format``, ``none``): the judge client against ``curate judge serve`` in each form, the
server's restriction to the allowed strings in each, cache keys, and the option plumbing."""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from curate.errors import ParameterError
from curate.selectors.critiq.fakes import GuidedRule, ScriptedManager, synthetic_functions, synthetic_pairs
from curate.selectors.critiq.flow import WORKER_CHOICES, CritiQFlow, FlowConfig
from curate.selectors.critiq.judge import (
    CHOICE_FORMATS,
    JudgeError,
    JudgeSession,
    OpenAICompatJudge,
    cache_key,
    choice_reply,
    choice_request,
)
from curate.selectors.critiq.server import LocalServer

MSGS = [{"role": "system", "content": "Judge."}, {"role": "user", "content": "Which is better, A or B?"}]
CONSTRAINED = ("structured_outputs", "guided_choice", "response_format")


def raw_form(form: str, value: object) -> dict[str, object]:
    """``value`` as the choice list of ``form``, unchecked (what a careless client might send)."""
    if form == "structured_outputs":
        return {"structured_outputs": {"choice": value}}
    if form == "guided_choice":
        return {"guided_choice": value}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {
        "type": "string", "enum": value}}}}


class Picker:
    """A guided backend that answers ``pick(choices)`` and records what the server handed it."""

    supports_guided_choice = True

    def __init__(self, pick) -> None:
        self.pick = pick
        self.seen: list[tuple[object, object]] = []

    def __call__(self, messages, params) -> str:
        self.seen.append((params.get("choice_format"), params.get("guided_choice")))
        return self.pick(params.get("guided_choice") or ["free text"])


@pytest.fixture(scope="module")
def server():
    backends = {"g": Picker(lambda cs: cs[-1]), "rogue": Picker(lambda cs: "outside"),
                "plain": lambda m, p: "free"}
    with LocalServer(backends) as srv:
        yield srv, backends


def test_default_form_is_structured_outputs() -> None:
    assert CHOICE_FORMATS[0] == "structured_outputs"
    assert OpenAICompatJudge("http://h/v1", "m").choice_format == "structured_outputs"
    assert choice_request("structured_outputs", ["a", "b"]) == {"structured_outputs": {"choice": ["a", "b"]}}
    assert choice_request("guided_choice", ["a"]) == {"guided_choice": ["a"]}
    assert choice_request("response_format", ["a", "b"]) == {"response_format": {
        "type": "json_schema", "json_schema": {"name": "choice", "schema": {"type": "string", "enum": ["a", "b"]}}}}


@pytest.mark.parametrize("form", CONSTRAINED)
def test_client_gets_a_valid_choice_in_each_form(server, form: str) -> None:
    srv, backends = server
    choices = ['{"answer": "A"}', '{"answer": "B"}', '{"answer": "None"}']
    judge = OpenAICompatJudge(srv.url, "g", backoff_s=0.01, choice_format=form)
    reply = judge.chat(MSGS, temperature=0, max_tokens=8, seed=0, guided_choice=choices)
    assert reply == '{"answer": "None"}'  # the backend's pick, decoded back from JSON for response_format
    assert backends["g"].seen[-1] == (form, choices)  # the server read the list from this form


@pytest.mark.parametrize("form", CONSTRAINED)
def test_server_restricts_each_form_to_the_allowed_strings(server, form: str) -> None:
    srv, _ = server
    url = f"{srv.url}/chat/completions"

    def post(model: str, choices) -> httpx.Response:
        return httpx.post(url, json={"model": model, "messages": MSGS, **raw_form(form, choices)})

    r = post("g", ["x", "y"])
    assert r.status_code == 200
    content = r.json()["choices"][0]["message"]["content"]
    assert content == (json.dumps("y") if form == "response_format" else "y")
    assert post("rogue", ["x", "y"]).status_code == 500  # a reply outside the list never leaves the server
    r = post("plain", ["x", "y"])
    assert r.status_code == 400 and form in r.json()["error"]["message"]
    for bad in ("x", [], [""], [1, 2], ["a"] * 65):
        assert post("g", bad).status_code == 400
    # the client surfaces a refusal without retrying
    with pytest.raises(JudgeError, match="does not support guided_choice"):
        OpenAICompatJudge(srv.url, "plain", backoff_s=0.01, choice_format=form).chat(
            MSGS, temperature=0, max_tokens=8, seed=0, guided_choice=["p"])


def test_server_refuses_unenforceable_or_mixed_forms(server) -> None:
    srv, backends = server
    url = f"{srv.url}/chat/completions"
    for extra in ({"structured_outputs": {"regex": "a+"}},
                  {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
                  {"response_format": {"type": "xml"}},
                  {"guided_choice": ["a"], "structured_outputs": {"choice": ["a"]}}):
        r = httpx.post(url, json={"model": "g", "messages": MSGS, **extra})
        assert r.status_code == 400, extra
    # a response_format without a choice list leaves the reply free
    r = httpx.post(url, json={"model": "g", "messages": MSGS, "response_format": {"type": "text"}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "free text"
    assert backends["g"].seen[-1] == (None, None)


def test_none_form_sends_no_constraint_and_declares_it(server) -> None:
    srv, backends = server
    judge = OpenAICompatJudge(srv.url, "g", backoff_s=0.01, choice_format="none")
    assert judge.supports_guided_choice is False
    assert judge.chat(MSGS, temperature=0, max_tokens=8, seed=0) == "free text"
    assert backends["g"].seen[-1] == (None, None)
    with pytest.raises(JudgeError, match="cannot restrict"):
        judge.chat(MSGS, temperature=0, max_tokens=8, seed=0, guided_choice=["a"])
    with pytest.raises(JudgeError, match="does not support guided_choice"):  # refused before any request
        JudgeSession(judge).chat(MSGS, temperature=0, max_tokens=8, guided_choice=["a"])


def test_unknown_form_is_a_parameter_error() -> None:
    with pytest.raises(ParameterError, match="choice_format"):
        OpenAICompatJudge("http://h/v1", "m", choice_format="outlines")
    from curate.selectors.critiq.steps import CritiQAnnotate

    with pytest.raises(ParameterError, match="choice_format"):
        CritiQAnnotate(criteria="c.json", judge_url="http://h/v1", choice_format="guided")._check_judge("critiq_annotate")
    from curate.cli.critiq import critiq

    res = CliRunner().invoke(critiq, ["annotate", "x.parquet", "--criteria", "c.json", "-o", "o.parquet",
                                      "--judge-url", "http://h/v1", "--choice-format", "guided"])
    assert res.exit_code == 2 and "--choice-format" in res.output


def test_response_format_reply_decoding() -> None:
    assert choice_reply("response_format", '"{\\"answer\\": \\"A\\"}"') == '{"answer": "A"}'
    assert choice_reply("response_format", "not json") == "not json"  # left to the caller's parser
    assert choice_reply("response_format", "[1]") == "[1]"
    assert choice_reply("structured_outputs", '"A"') == '"A"'  # other forms reply with the string itself


def test_cache_key_is_the_same_in_every_constrained_form(server, tmp_path) -> None:
    """The form changes the spelling, not the question: one cached reply serves every form, and
    the key is the one the default form has always had (the choice list, no form)."""
    srv, backends = server
    path = tmp_path / "c.sqlite"
    n0 = len(backends["g"].seen)
    for form in CONSTRAINED:
        s = JudgeSession(OpenAICompatJudge(srv.url, "g", backoff_s=0.01, choice_format=form, endpoint="local"), path)
        assert s.chat(MSGS, temperature=0, max_tokens=8, seed=0, guided_choice=["a", "b"]) == "b"
    assert len(backends["g"].seen) == n0 + 1
    key = cache_key("g@local", MSGS, temperature=0, max_tokens=8, seed=0, attempt=0, guided_choice=["a", "b"])
    assert s.cache.get(key) == "b"


@pytest.mark.parametrize("form", CONSTRAINED)
def test_flow_with_guided_workers_in_each_form(form: str) -> None:
    """The Flow's guided workers vote through the server in every form with the same results."""
    texts, q = synthetic_functions(120, seed=0)
    task = synthetic_pairs(texts, q, n_pairs=12, seed=0)
    kb = [("docs_kb", "Prefer functions that have a docstring."), ("readability", "Prefer readable code.")]
    rule = GuidedRule()
    with LocalServer({"rule": rule, "m": ScriptedManager()}) as srv:
        w = JudgeSession(OpenAICompatJudge(srv.url, "rule", backoff_s=0.01, choice_format=form))
        m = JudgeSession(OpenAICompatJudge(srv.url, "m", backoff_s=0.01, choice_format=form))
        res = CritiQFlow(w, m, FlowConfig(n_criteria=3, epochs=1, worker_guided_choice=True), kb=kb).run(task)
    assert res.criteria and rule.choices_seen == {WORKER_CHOICES} and rule.forms_seen == {form}
    assert w.stats.as_dict()  # every worker call went through the server
