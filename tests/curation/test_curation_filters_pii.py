"""Heuristic filters (one planted row per rule) and PII detectors / redaction."""

from __future__ import annotations

import pytest

from curate.curation import HeuristicFilter, filter_table, find_pii, pii_scan, redact_table, redact_text
from curate.curation.pii import PII, luhn_ok, pii_counts
from curate.errors import ParameterError
from curate.pipeline.step import StepContext
from curate.schema import make_record, message, texts, to_frame


def _sft(prompt: str, response: str) -> dict:
    return make_record("sft", messages=[message("user", prompt), message("assistant", response)])


GOOD = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."


@pytest.mark.parametrize(("prompt", "response", "params", "rule"), [
    ("Explain photosynthesis.", GOOD, {}, None),
    ("   ", GOOD, {}, "empty_turn"),
    ("Hi", GOOD, {}, "too_short"),
    ("Explain photosynthesis.", GOOD * 3, {"max_chars": 100}, "too_long"),
    ("Explain photosynthesis.", GOOD * 5, {"max_length_ratio": 10}, "length_ratio"),
    ("Write code.", "```python\nprint(1)\n", {}, "unbalanced_fence"),
    ("Explain photosynthesis.", GOOD + " and then the", {"truncation_chars": 50}, "truncated"),
    ("Explain photosynthesis.", "As an AI language model, I cannot explain that.", {}, "refusal"),
    ("Explain photosynthesis.", "buy now " * 40, {}, "repetition"),
    ("Explain photosynthesis.", "12345 67890 !!! ### $$$ 1234 5678 %%% 999 000 111", {}, "non_language"),
])
def test_each_rule_fires_with_its_reason(prompt, response, params, rule):
    out = filter_table(to_frame([_sft(prompt, response)]), **params)
    assert out["rule"][0] == rule
    assert out["keep"][0] is (rule is None)
    if rule:
        assert out["reason"][0].startswith(rule + ":")


def test_identical_pair_and_disabled_rules():
    pair = make_record("preference", prompt=[message("user", "Which is better?")],
                       chosen=[message("assistant", "Same answer.")], rejected=[message("assistant", "Same answer.")])
    t = to_frame([pair])
    assert filter_table(t)["rule"][0] == "identical_pair"
    assert filter_table(t, identical_pair=False)["keep"][0]
    bad = to_frame([_sft("Explain photosynthesis.", "As an AI language model, no.")])
    assert filter_table(bad, refusal_phrases=[])["keep"][0]


def test_filter_params_validated():
    with pytest.raises(ParameterError, match="'max_repeat_ratio' parameter of HeuristicFilter"):
        HeuristicFilter(max_repeat_ratio=2)
    with pytest.raises(ParameterError, match="tokenizer"):  # a token bound needs counts or a tokenizer
        HeuristicFilter(max_tokens=10).apply(to_frame([_sft("Explain photosynthesis.", GOOD)]), StepContext())
    assert HeuristicFilter().apply(to_frame([_sft("Explain photosynthesis.", GOOD)]), StepContext())["keep"][0]


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")


@pytest.mark.parametrize(("text", "kind"), [
    ("write to jane.doe+tag@mail.example.org today", "email"),
    ("call +1 (415) 555-0132 now", "phone"),
    ("call 415-555-0132 now", "phone"),
    ("server at 10.0.12.254 is down", "ip_address"),
    ("ipv6 2001:db8:85a3::8a2e:370:7334 here", "ip_address"),
    ("card 4111 1111 1111 1111 exp", "credit_card"),
    ("key AKIAIOSFODNN7EXAMPLE in config", "secret"),
    ("token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 ok", "secret"),
    ("secret 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", "secret"),
])
def test_detectors_find(text, kind):
    assert [k for k, _, _ in find_pii(text)] == [kind]


@pytest.mark.parametrize("text", [
    "version 1.2.3 released", "the answer is 3.14159", "meet at 12:30:45", "card 4111 1111 1111 1112 (bad Luhn)",
    "in 2023-2024 we grew 15%", "sha 0123456789abcdef0123456789abcdef", "x = 1234567",
    "call_function_with_a_really_long_snake_case_name()",
])
def test_detectors_ignore(text):
    assert find_pii(text) == []


def test_redaction_and_step_stats():
    text = "Mail a@b.co or 10.1.1.1, card 4111-1111-1111-1111."
    red, counts = redact_text(text)
    assert red == "Mail [EMAIL] or [IP_ADDRESS], card [CREDIT_CARD]."
    assert dict(counts) == {"email": 1, "ip_address": 1, "credit_card": 1}
    t = to_frame([_sft("My email is a@b.co", "Noted, a@b.co."), _sft("Clean", "Clean answer")])
    flag = pii_scan(t)
    assert flag["keep"].to_list() == [True, True] and flag["score"].to_list() == [2.0, 0.0]
    drop = pii_scan(t, action="drop")
    assert drop["keep"].to_list() == [False, True] and drop["reason"][0] == "pii: email=2"
    assert texts(redact_table(t), "prompt+response")[0] == "My email is [EMAIL]\n\nNoted, [EMAIL]."
    ctx = StepContext()
    out = PII(action="redact").apply(t, ctx)
    assert out["redacted"][0] is not None and out["redacted"][1] is None
    assert ctx.stats["pii"]["counts"] == pii_counts(out) and ctx.stats["pii"]["counts"]["email"] == 2
    with pytest.raises(ParameterError, match="'action' parameter of PII"):
        PII(action="mask")
