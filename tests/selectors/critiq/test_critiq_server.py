"""`curate judge serve` pieces: the app with the real default model (slow) and the CLI wiring."""

from __future__ import annotations

import json

import httpx
import pytest
from click.testing import CliRunner

from curate.selectors.critiq.server import LocalServer


def test_models_endpoint_and_bad_request() -> None:
    with LocalServer({"a": lambda m, p: "x", "b": lambda m, p: "y"}) as srv:
        r = httpx.get(f"{srv.url}/models")
        assert [d["id"] for d in r.json()["data"]] == ["a", "b"]
        r = httpx.post(f"{srv.url}/chat/completions", json={"model": "b", "messages": [{"role": "user", "content": "q"}]})
        assert r.json()["choices"][0]["message"]["content"] == "y"
        r = httpx.post(f"{srv.url}/chat/completions", json={"model": "b", "messages": "nope"})
        assert r.status_code == 400


def test_cli_verbs_attached() -> None:
    from curate.cli import cli

    out = CliRunner().invoke(cli, ["critiq", "--help"]).output
    assert "mine" in out and "annotate" in out and "score" in out
    assert "--port" in CliRunner().invoke(cli, ["judge", "serve", "--help"]).output


@pytest.mark.slow
def test_default_model_answers_chat_completion() -> None:
    import torch

    torch.set_num_threads(2)
    from curate.selectors.critiq.judge import OpenAICompatJudge
    from curate.selectors.critiq.server import LMBackend

    backend = LMBackend("default", device="cpu").load()
    with LocalServer({"smollm2-135m-instruct": backend}) as srv:
        j = OpenAICompatJudge(srv.url, "smollm2-135m-instruct", timeout_s=300)
        msgs = [{"role": "user", "content": "Say hello."}]
        a = j.chat(msgs, temperature=0.0, max_tokens=8, seed=0)
        b = j.chat(msgs, temperature=0.0, max_tokens=8, seed=0)
        from curate.selectors.critiq.flow import WORKER_CHOICES

        g = [j.chat(msgs, temperature=t, max_tokens=8, seed=s, guided_choice=list(WORKER_CHOICES))
             for t, s in ((0.0, 0), (0.0, 1), (1.0, 3))]
    assert isinstance(a, str) and a.strip() and a == b  # greedy decoding is deterministic
    json.dumps(a)
    assert all(x in WORKER_CHOICES for x in g) and g[0] == g[1]  # greedy ignores the seed
