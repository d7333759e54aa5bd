"""Instruction and chat formats: Alpaca, ShareGPT, OpenAI messages, TRL pairs, HH-RLHF.

References for the shapes (read from the real files in ../shared/data, not from code):
Alpaca (Taori et al., 2023, ``instruction/input/output``; LLaMA-Factory adds ``system`` and
``history``), ShareGPT/Vicuna (``conversations`` of ``{from, value}``), OpenAI chat
``messages``, TRL preference datasets (``prompt/chosen/rejected``; implicit prompt when only
``chosen``/``rejected`` conversations are given), Anthropic HH-RLHF (Bai et al., 2022) transcripts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from curate.io.formats._common import (
    Ctx,
    FormatInfo,
    Rejected,
    assistant,
    conversation,
    join_prompt,
    messages_of,
    meta_of,
    need,
    need_dict,
    opt,
    pair,
    source_id,
    user,
)
from curate.schema import Message


def _is(obj: Any) -> bool:
    return isinstance(obj, Mapping)


# ----------------------------------------------------------------------------- alpaca
_ALPACA_OUT = ("output", "response", "completion")


def _alpaca_detect(obj: Any) -> bool:
    return _is(obj) and "instruction" in obj and any(k in obj for k in _ALPACA_OUT) and "instances" not in obj


def _alpaca(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    """Alpaca ``instruction`` + optional ``input`` -> user turn; ``output`` (or ``response``) ->
    assistant turn. ``system`` and ``history`` ([[user, assistant], ...]) as in LLaMA-Factory."""
    obj = need_dict(obj, ctx)
    instruction = need(obj, "instruction", ctx)
    inp = opt(obj, "input", ctx)
    out_key = next((k for k in _ALPACA_OUT if k in obj), "output")
    output = need(obj, out_key, ctx) if ctx.kind == "sft" else opt(obj, out_key, ctx)
    msgs: list[Message] = []
    system = opt(obj, "system", ctx)
    if system:
        msgs.append({"role": "system", "content": system})
    for i, turn in enumerate(opt(obj, "history", ctx, list, "a list of [user, assistant] pairs") or []):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ctx.error("malformed history turn.", field=f"history[{i}]", expected="[user: str, assistant: str]", found=turn)
        msgs += [user(turn[0]), assistant(turn[1])]
    msgs.append(user(join_prompt(instruction, inp)))
    sid, id_key = source_id(obj)
    known = {"instruction", "input", out_key, "system", "history", id_key}
    if out_key == "output" and "response" in obj and obj["response"] == obj["output"]:
        known.add("response")  # new_codealpaca repeats the output under "response"
    if output is not None:
        msgs.append(assistant(output))
    return [conversation(ctx, msgs, sid=sid, meta=meta_of(obj, known))]


# ----------------------------------------------------------------------------- sharegpt
def _sharegpt_detect(obj: Any) -> bool:
    return _is(obj) and isinstance(obj.get("conversations"), list) and "chosen" not in obj


def _sharegpt_pref_detect(obj: Any) -> bool:
    return _is(obj) and isinstance(obj.get("conversations"), list) and "chosen" in obj and "rejected" in obj


def _sharegpt_turns(obj: Mapping[str, Any], ctx: Ctx) -> list[Message]:
    msgs = messages_of(need(obj, "conversations", ctx, list, "a list of {from, value}"), ctx, "conversations",
                       role_key="from", content_key="value")
    system = opt(obj, "system", ctx)
    return ([{"role": "system", "content": system}] if system else []) + msgs


def _sharegpt(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    obj = need_dict(obj, ctx)
    sid, id_key = source_id(obj)
    msgs = _sharegpt_turns(obj, ctx)
    return [conversation(ctx, msgs, sid=sid, meta=meta_of(obj, {"conversations", "system", id_key}))]


def _one_or_many(value: Any, ctx: Ctx, name: str) -> list[Message]:
    if isinstance(value, Mapping):
        value = [value]
    return messages_of(value, ctx, name, role_key="from", content_key="value")


def _sharegpt_pref(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    """LLaMA-Factory ShareGPT preference: ``conversations`` is the prompt, ``chosen`` and
    ``rejected`` are one ``{from, value}`` reply each (or lists of them)."""
    obj = need_dict(obj, ctx)
    sid, id_key = source_id(obj)
    prompt = _sharegpt_turns(obj, ctx)
    chosen = _one_or_many(need(obj, "chosen", ctx, (dict, list), "a {from, value} message"), ctx, "chosen")
    rejected = _one_or_many(need(obj, "rejected", ctx, (dict, list), "a {from, value} message"), ctx, "rejected")
    meta = meta_of(obj, {"conversations", "system", "chosen", "rejected", id_key})
    return [pair(ctx, prompt, chosen, rejected, sid=sid, meta=meta)]


# ----------------------------------------------------------------------------- openai messages
def _messages_detect(obj: Any) -> bool:
    return _is(obj) and isinstance(obj.get("messages"), list) and "chosen" not in obj


def _messages(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    """OpenAI chat ``messages``; content may be a list of text parts (LLaMA-Factory v1). Per-message
    ``loss_weight`` and a KTO ``label`` are kept in ``meta`` (``loss_weights``, ``label``)."""
    obj = need_dict(obj, ctx)
    raw = need(obj, "messages", ctx, list, "a list of {role, content}")
    msgs = messages_of(raw, ctx, "messages")
    weights = [m.get("loss_weight") for m in raw if isinstance(m, Mapping)]
    sid, id_key = source_id(obj)
    extra = {"loss_weights": weights} if any(w is not None for w in weights) else {}
    return [conversation(ctx, msgs, sid=sid, meta=meta_of(obj, {"messages", id_key}, **extra))]


# ----------------------------------------------------------------------------- trl pairs
def _trl_detect(obj: Any) -> bool:
    if not _is(obj):
        return False
    if "chosen_messages" in obj and "rejected_messages" in obj:
        return True
    if "prompt" in obj and ("chosen" in obj or "rejected" in obj):
        return True  # a missing side is then a row error, never a prompt-only target
    if "chosen" not in obj or "rejected" not in obj:
        return False
    return isinstance(obj["chosen"], list)  # implicit prompt: full conversations


def _side(value: Any, ctx: Ctx, name: str) -> list[Message]:
    if isinstance(value, str):
        return [assistant(value)]
    return messages_of(value, ctx, name)


def _split_common(a: list[Message], b: list[Message], ctx: Ctx) -> tuple[list[Message], list[Message], list[Message]]:
    """Implicit prompt (TRL): the longest shared prefix of turns, kept to end before an assistant turn."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    while k > 0 and a[k - 1]["role"] == "assistant" and (k >= len(a) or a[k]["role"] != "assistant"):
        k -= 1  # never let the shared prefix swallow a whole reply
    if k == 0 or k == len(a) or k == len(b):
        raise Rejected("chosen and rejected conversations share no prompt (or one contains the other).", "chosen")
    return a[:k], a[k:], b[k:]


def _trl(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    """TRL ``prompt/chosen/rejected`` (strings or message lists), implicit-prompt
    ``chosen/rejected`` conversations, and LLaMA-Factory v1 ``chosen_messages/rejected_messages``."""
    obj = need_dict(obj, ctx)
    sid, id_key = source_id(obj)
    if "chosen_messages" in obj:
        keys = ("chosen_messages", "rejected_messages")
        raw_c, raw_r = (need(obj, k, ctx, list, "a list of {role, content}") for k in keys)
        prompt, chosen, rejected = _split_common(messages_of(raw_c, ctx, keys[0]), messages_of(raw_r, ctx, keys[1]), ctx)
        weights = [m.get("loss_weight") for m in raw_c if isinstance(m, Mapping)]
        extra = {"loss_weights": weights} if any(w is not None for w in weights) else {}
        return [pair(ctx, prompt, chosen, rejected, sid=sid, meta=meta_of(obj, {*keys, id_key}, **extra))]
    what = "a string or a list of {role, content}"
    c = need(obj, "chosen", ctx, (str, list), what)
    r = need(obj, "rejected", ctx, (str, list), what)
    if "prompt" in obj:
        p = need(obj, "prompt", ctx, (str, list), what)
        prompt = [user(p)] if isinstance(p, str) else messages_of(p, ctx, "prompt")
        chosen, rejected = _side(c, ctx, "chosen"), _side(r, ctx, "rejected")
    else:
        prompt, chosen, rejected = _split_common(_side(c, ctx, "chosen"), _side(r, ctx, "rejected"), ctx)
    label = opt(obj, "label_source", ctx)
    return [pair(ctx, prompt, chosen, rejected, label_source=label, sid=sid,
                 meta=meta_of(obj, {"prompt", "chosen", "rejected", "label_source", id_key}))]


# ----------------------------------------------------------------------------- hh-rlhf
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_LAST = "\n\nAssistant:"


def _hh_detect(obj: Any) -> bool:
    return (_is(obj) and set(obj) >= {"chosen", "rejected"} and "prompt" not in obj
            and isinstance(obj["chosen"], str) and obj["chosen"].lstrip(" ").startswith("\n\nHuman:"))


def _hh_turns(text: str, ctx: Ctx, name: str) -> list[Message]:
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ctx.error("transcript does not start with a turn.", field=name, expected="'\\n\\nHuman: ...'", found=text[:60])
    return [user(body.strip()) if role == "Human" else assistant(body.strip())
            for role, body in zip(parts[1::2], parts[2::2], strict=True)]


def _hh(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    """Anthropic HH-RLHF (Bai et al., 2022): ``chosen`` and ``rejected`` are whole transcripts.
    The prompt is everything before the last ``\\n\\nAssistant:``; the two prompts must be equal,
    otherwise the pair is reported (``Rejected``) rather than guessed. Turn texts are stripped."""
    obj = need_dict(obj, ctx)
    c, r = need(obj, "chosen", ctx), need(obj, "rejected", ctx)
    ic, ir = c.rfind(_HH_LAST), r.rfind(_HH_LAST)
    for name, idx in (("chosen", ic), ("rejected", ir)):
        if idx < 0:
            raise ctx.error("transcript without an assistant turn.", field=name, expected="'\\n\\nAssistant:' in the text",
                            found=(c if name == "chosen" else r)[:60])
    if c[:ic] != r[:ir]:
        raise Rejected("chosen and rejected transcripts differ before the last '\\n\\nAssistant:' (no shared prompt).", "chosen")
    prompt = _hh_turns(c[:ic], ctx, "chosen")
    chosen = [assistant(c[ic + len(_HH_LAST):].strip())]
    rejected = [assistant(r[ir + len(_HH_LAST):].strip())]
    sid, id_key = source_id(obj)
    return [pair(ctx, prompt, chosen, rejected, label_source="human", sid=sid,
                 meta=meta_of(obj, {"chosen", "rejected", id_key}))]


FORMATS = [
    FormatInfo("hh_rlhf", "Anthropic HH-RLHF chosen/rejected transcripts, split at the last '\\n\\nAssistant:'",
               ("preference", "sft", "target"), "preference", _hh_detect, _hh),
    FormatInfo("trl", "TRL prompt/chosen/rejected (strings or messages; implicit prompt; LLaMA-Factory v1 chosen_messages)",
               ("preference", "sft", "target"), "preference", _trl_detect, _trl),
    FormatInfo("sharegpt_preference", "ShareGPT conversations + chosen/rejected replies (LLaMA-Factory dpo)",
               ("preference", "sft", "target"), "preference", _sharegpt_pref_detect, _sharegpt_pref),
    FormatInfo("sharegpt", "ShareGPT conversations of {from, value}", ("sft", "target"), "sft", _sharegpt_detect, _sharegpt),
    FormatInfo("messages", "OpenAI chat messages (text parts, loss_weight, KTO label kept in meta)",
               ("sft", "target"), "sft", _messages_detect, _messages),
    FormatInfo("alpaca", "Alpaca instruction/input/output (also response; system, history)",
               ("sft", "target"), "sft", _alpaca_detect, _alpaca),
]
