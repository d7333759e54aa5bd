"""Guided-choice replies (vLLM's ``guided_choice``): the local backend's constrained decoding against
full-forward references, the server's contract, the client and cache, and the Flow with guided workers."""

from __future__ import annotations

import hashlib
import itertools

import httpx
import pytest

from curate.schema import canonical_json
from curate.selectors.critiq.fakes import (
    BackendJudge,
    GuidedRule,
    RuleJudge,
    ScriptedManager,
    synthetic_functions,
    synthetic_pairs,
)
from curate.selectors.critiq.flow import (
    SINGLE_CHOICES,
    WORKER_CHOICES,
    CritiQFlow,
    FlowConfig,
    judge_single_prompt,
)
from curate.selectors.critiq.judge import (
    JudgeError,
    JudgeSession,
    OpenAICompatJudge,
    cache_key,
)
from curate.selectors.critiq.server import LMBackend, LocalServer

torch = pytest.importorskip("torch")
MSGS = [{"role": "system", "content": "Judge."}, {"role": "user", "content": "Which is better, A or B?"}]


# --------------------------------------------------------------------------- LMBackend on a tiny model
@pytest.fixture(scope="module")
def tiny_backend() -> LMBackend:
    from curate.features.tiny import tiny_llama, tiny_tokenizer

    b = LMBackend("tiny", device="cpu")
    lm = tiny_llama(seed=3, hidden=32, layers=2)
    # large random weights: the default init (std 0.02) leaves the next token decided by the current
    # token's embedding alone, and a decoder that lost its context would go unnoticed
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for prm in lm.parameters():
            if prm.dim() == 2:
                prm.copy_(torch.randn(prm.shape, generator=g, dtype=prm.dtype) * 0.5)
    b._lm, b._tok = lm, tiny_tokenizer()
    return b


def _prompt(b: LMBackend, messages: list[dict[str, str]]) -> list[int]:
    return b._prompt_ids(messages)[0].tolist()


def _next_logits(b: LMBackend, ids: list[int]) -> torch.Tensor:
    """Full forward without any cache: the reference the KV-cached decoder must match."""
    with torch.no_grad():
        return b._lm(torch.tensor([ids])).logits[0, -1]


def _reference(b: LMBackend, messages: list[dict[str, str]], choices: list[str]) -> str:
    """Greedy constrained decoding re-run from scratch at every step (no KV cache)."""
    prompt = _prompt(b, messages)
    toks = b.choice_tokens(choices)
    eos = b._tok.eos_token_id
    alive, j = list(range(len(choices))), 0
    while len(alive) > 1:
        prefix = toks[alive[0]][:j]
        logits = _next_logits(b, prompt + prefix)

        def score(i: int, logits: torch.Tensor = logits, j: int = j) -> float:
            return float(logits[toks[i][j]] if len(toks[i]) > j else logits[eos])

        best = max(score(i) for i in alive)
        tok_best = min((toks[i][j] if len(toks[i]) > j else eos) for i in alive if score(i) == best)
        alive = [i for i in alive if (toks[i][j] if len(toks[i]) > j else eos) == tok_best]
        j += 1
        if tok_best == eos:
            break
    return choices[alive[0]]


def test_single_divergence_is_argmax_of_next_token(tiny_backend) -> None:
    """Replies like ``{"answer": "X"}`` share a prefix and differ in one byte: the pick is the
    argmax of the next-token logits after that prefix over the allowed letters."""
    b = tiny_backend
    common = b.choice_tokens(['{"answer": "'])[0]
    alphabet = "ABNCDxyz"
    picks = []
    for k in range(12):
        letters = [alphabet[(k + i * 3) % len(alphabet)] for i in range(3)]
        choices = [f'{{"answer": "{x}"}}' for x in letters]
        ids = [b.choice_tokens([x])[0][0] for x in letters]
        msgs = [{"role": "user", "content": f"Compare text {k} and text {k * 7 % 5}. " * (k % 3 + 1)}]
        logits = _next_logits(b, _prompt(b, msgs) + common)
        want = choices[int(torch.argmax(logits[ids]))]
        got = b(msgs, {"temperature": 0.0, "guided_choice": choices})
        assert got == want
        picks.append(got)
    assert len(set(picks)) > 2, "the pick must depend on the allowed set"


@pytest.mark.parametrize("choices", [
    ["ab", "abc", "b"],               # one choice is a prefix of another: EOS competes with 'c'
    ["yes", "no", "maybe", "yesno"],
    ['{"answer": "A"}', '{"answer": "B"}', '{"answer": "None"}', '{"x": 1}'],
])
def test_cached_decoder_matches_full_forward_reference(tiny_backend, choices) -> None:
    b = tiny_backend
    for k in range(6):
        msgs = [{"role": "user", "content": f"prompt number {k}: " + "xy" * k}]
        got = b(msgs, {"temperature": 0.0, "guided_choice": choices})
        assert got in choices
        assert got == _reference(b, msgs, choices)
        # the allowed set, not its order, decides (no exact ties in float64 logits)
        for perm in itertools.islice(itertools.permutations(choices), 4):
            assert b(msgs, {"temperature": 0.0, "guided_choice": list(perm)}) == got


def test_sampling_follows_renormalised_probabilities(tiny_backend) -> None:
    """At temperature 1 the pick frequencies match softmax over the allowed next tokens; seeded."""
    b = tiny_backend
    msgs = [{"role": "user", "content": "sample me"}]
    common = b.choice_tokens(['{"answer": "'])[0]
    letters = [b.choice_tokens([x])[0][0] for x in ("A", "B", "N")]
    p = torch.softmax(_next_logits(b, _prompt(b, msgs) + common)[letters].double(), 0).tolist()
    n = 400
    picks = [b(msgs, {"temperature": 1.0, "seed": s, "guided_choice": list(WORKER_CHOICES)}) for s in range(n)]
    for choice, want in zip(WORKER_CHOICES, p, strict=True):
        freq = picks.count(choice) / n
        assert abs(freq - want) < 4 * (want * (1 - want) / n) ** 0.5 + 1e-3, (choice, freq, want)
    again = [b(msgs, {"temperature": 1.0, "seed": s, "guided_choice": list(WORKER_CHOICES)}) for s in range(20)]
    assert again == picks[:20]


# --------------------------------------------------------------------------- server and client contract
class _Guided:
    """A backend that supports guided_choice and answers ``pick(choices)``."""

    supports_guided_choice = True

    def __init__(self, pick) -> None:
        self.pick = pick
        self.seen: list[list[str] | None] = []

    def __call__(self, messages, params) -> str:
        self.seen.append(params.get("guided_choice"))
        return self.pick(params.get("guided_choice") or ["free text"])


def test_server_guided_choice_contract() -> None:
    good = _Guided(lambda cs: cs[-1])
    with LocalServer({"plain": lambda m, p: "x", "g": good, "rogue": _Guided(lambda cs: "outside")}) as srv:
        url = f"{srv.url}/chat/completions"

        def post(model: str, gc) -> httpx.Response:
            return httpx.post(url, json={"model": model, "messages": MSGS, "guided_choice": gc})

        r = post("g", ["x", "y"])
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "y"
        assert good.seen[-1] == ["x", "y"]
        for bad in ("x", [], [""], [1, 2], ["a"] * 65):
            assert post("g", bad).status_code == 400
        r = post("plain", ["x", "y"])
        assert r.status_code == 400 and "does not support guided_choice" in r.json()["error"]["message"]
        assert post("rogue", ["x", "y"]).status_code == 500
        # without guided_choice nothing changes
        r = httpx.post(url, json={"model": "g", "messages": MSGS})
        assert r.json()["choices"][0]["message"]["content"] == "free text" and good.seen[-1] is None
        # the client sends it; a 400 is not retried and names the reason
        j = OpenAICompatJudge(srv.url, "g", backoff_s=0.01)
        assert j.chat(MSGS, temperature=0, max_tokens=8, seed=0, guided_choice=["p", "q"]) == "q"
        with pytest.raises(JudgeError, match="does not support guided_choice"):
            OpenAICompatJudge(srv.url, "plain", backoff_s=0.01).chat(MSGS, temperature=0, max_tokens=8, seed=0,
                                                                     guided_choice=["p"])


def test_cache_key_and_session(tmp_path) -> None:
    old = hashlib.sha256(canonical_json({"judge": "m", "messages": MSGS, "temperature": 0.0, "max_tokens": 8,
                                         "seed": 0, "attempt": 0}).encode()).hexdigest()
    k = cache_key("m", MSGS, temperature=0, max_tokens=8, seed=0, attempt=0)
    assert k == old, "free-text keys must not change (existing caches stay valid)"
    kg = cache_key("m", MSGS, temperature=0, max_tokens=8, seed=0, attempt=0, guided_choice=["a", "b"])
    assert kg != k and kg != cache_key("m", MSGS, temperature=0, max_tokens=8, seed=0, attempt=0,
                                       guided_choice=["b", "a"])
    backend = _Guided(lambda cs: cs[0])
    s = JudgeSession(BackendJudge(backend, "g"), tmp_path / "c.sqlite")
    assert s.chat(MSGS, temperature=0, max_tokens=8, guided_choice=["a", "b"]) == "a"
    assert s.chat(MSGS, temperature=0, max_tokens=8) == "free text"  # not served from the guided entry
    assert s.chat(MSGS, temperature=0, max_tokens=8, guided_choice=["a", "b"]) == "a"
    assert s.stats.n_fresh == 2 and len(backend.seen) == 2
    plain = JudgeSession(BackendJudge(lambda m, p: "x", "plain"))
    with pytest.raises(JudgeError, match="does not support guided_choice"):
        plain.chat(MSGS, temperature=0, max_tokens=8, guided_choice=["a"])


# --------------------------------------------------------------------------- the Flow with guided workers
def test_flow_with_guided_workers_matches_free_text() -> None:
    """Guided replies carry the same votes, so the Flow mines the same criteria; over HTTP too."""
    texts, q = synthetic_functions(200, seed=0)
    task = synthetic_pairs(texts, q, n_pairs=30, seed=0)
    kb = [("docs_kb", "Prefer functions that have a docstring."), ("readability", "Prefer readable code.")]
    cfg = {"n_criteria": 5, "epochs": 1}
    free = CritiQFlow(JudgeSession(BackendJudge(RuleJudge(), "rule")), JudgeSession(BackendJudge(ScriptedManager(), "m")),
                      FlowConfig(**cfg), kb=kb).run(task)
    rule = GuidedRule()
    with LocalServer({"rule": rule, "m": ScriptedManager()}) as srv:
        w = JudgeSession(OpenAICompatJudge(srv.url, "rule", backoff_s=0.01))
        m = JudgeSession(OpenAICompatJudge(srv.url, "m", backoff_s=0.01))
        guided = CritiQFlow(w, m, FlowConfig(**cfg, worker_guided_choice=True), kb=kb).run(task)
        single = judge_single_prompt(w, task[:6], guided_choice=True)
    assert free.criteria and guided.criteria_json() == free.criteria_json()
    assert rule.choices_seen == {WORKER_CHOICES, SINGLE_CHOICES}
    assert all(r.status == "ok" for r in single)
    # a worker that cannot be guided is refused up front, not silently asked for free text
    no = CritiQFlow(JudgeSession(BackendJudge(RuleJudge(), "rule")), JudgeSession(BackendJudge(ScriptedManager(), "m")),
                    FlowConfig(**cfg, worker_guided_choice=True), kb=kb)
    with pytest.raises(JudgeError, match="guided_choice"):
        no.run(task)


def test_long_conversation_keeps_system_message(tiny_backend) -> None:
    """Over the window the oldest turns go first; the system prompt and the last turn stay."""
    b = tiny_backend
    msgs = [{"role": "system", "content": "SYSTEM RULES"}]
    for k in range(6):
        msgs += [{"role": "user", "content": f"question {k} " + "q" * 40},
                 {"role": "assistant", "content": f"answer {k} " + "a" * 40}]
    msgs.append({"role": "user", "content": "LAST QUESTION"})
    full = b._template(msgs).shape[1]
    old = b.max_input_tokens
    try:
        b.max_input_tokens = full - 30
        text = b._tok.decode(b._prompt_ids(msgs)[0])
        assert text.startswith("<|im_start|>system\nSYSTEM RULES") and "LAST QUESTION" in text
        assert "question 0" not in text and "question 5" in text
        assert text.index("<|im_end|>\n<|im_start|>user") < text.index("question")  # starts at a user turn
        b.max_input_tokens = 12  # one message longer than the window: its end is kept
        ids = b._prompt_ids(msgs)
        assert ids.shape[1] == 12 and b._tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
        b.max_input_tokens = full  # fits: unchanged
        assert b._prompt_ids(msgs)[0].tolist() == b._template(msgs)[0].tolist()
    finally:
        b.max_input_tokens = old
