"""Judged preference sources: PandaLM test set, AlpacaEval annotations, OpenAssistant trees.

PandaLM (Wang et al., 2023): three human annotators vote 1 / 2 / 0 (tie) per response pair; a
label with at least two votes is the majority; a tie majority or no majority is reported, not
guessed. AlpacaEval (Li et al., 2023; Dubois et al., 2024): a GPT-4 judge's ``preference`` 1 or 2;
0 (or 1.5) is a tie and is reported. OpenAssistant Conversations (Köpf et al., 2023): message trees
with human ``rank`` (0 = best) among sibling replies; every node with >= 2 ranked replies gives the
best-vs-worst pair, and the rank-0 path from the root is the SFT conversation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from curate.io.formats._common import (
    Ctx,
    FormatInfo,
    Rejected,
    assistant,
    conversation,
    join_prompt,
    meta_of,
    need,
    need_dict,
    opt,
    pair,
    user,
)
from curate.schema import ROLE_ALIASES, Message

# ----------------------------------------------------------------------------- pandalm
_PANDA_VOTES = ("annotator1", "annotator2", "annotator3")


def _pandalm_detect(obj: Any) -> bool:
    return isinstance(obj, Mapping) and {"response1", "response2", "annotator1"} <= set(obj)


def _pandalm(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    obj = need_dict(obj, ctx)
    instruction = need(obj, "instruction", ctx)
    inp = opt(obj, "input", ctx)
    # testset-v1.json holds six responses as JSON booleans (a model answering "True"); the
    # deviation from strict typing is limited to these two fields and to scalars.
    r1, r2 = (_scalar_text(obj, k, ctx) for k in ("response1", "response2"))
    keys = [k for k in obj if k.startswith("annotator")] or list(_PANDA_VOTES)
    votes = []
    for k in sorted(keys):
        v = need(obj, k, ctx, int, "0, 1 or 2")
        if v not in (0, 1, 2):
            raise ctx.error("bad vote.", field=k, expected="0 (tie), 1 or 2", found=v)
        votes.append(v)
    label, n = Counter(votes).most_common(1)[0]
    if n * 2 <= len(votes) or label == 0:
        raise Rejected(f"annotators tie or have no majority (votes {votes}).", "annotator1")
    chosen, rejected = (r1, r2) if label == 1 else (r2, r1)
    signed = [0 if v == 0 else (1 if v == label else -1) for v in votes]
    meta = meta_of(obj, {"idx", "instruction", "input", "response1", "response2", *keys}, chosen_response=label)
    return [pair(ctx, [user(join_prompt(instruction, inp))], [assistant(chosen)], [assistant(rejected)],
                 label_source="human", annotators=signed, sid=obj.get("idx"), meta=meta)]


def _scalar_text(obj: Mapping[str, Any], key: str, ctx: Ctx) -> str:
    value = obj.get(key)
    if isinstance(value, (bool, int, float)):
        return str(value)
    return need(obj, key, ctx)


# ----------------------------------------------------------------------------- alpaca_eval
def _ae_ann_detect(obj: Any) -> bool:
    return isinstance(obj, Mapping) and {"output_1", "output_2", "preference"} <= set(obj)


def _ae_annotations(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    obj = need_dict(obj, ctx)
    instruction = need(obj, "instruction", ctx)
    o1, o2 = need(obj, "output_1", ctx), need(obj, "output_2", ctx)
    pref = obj.get("preference")
    if pref is None or pref in (0, 1.5):
        raise Rejected(f"judge preference is a tie ({pref!r}).", "preference")
    if isinstance(pref, bool) or not isinstance(pref, (int, float)) or not 1 <= pref <= 2:
        raise ctx.error("bad preference.", field="preference", expected="1 or 2 (0 or 1.5 = tie)", found=pref)
    first = pref < 1.5
    chosen, rejected = (o1, o2) if first else (o2, o1)
    annotator = obj.get("annotator")
    label = "gpt4" if annotator is None or "gpt4" in str(annotator) else str(annotator)
    meta = meta_of(obj, {"instruction", "output_1", "output_2"})
    return [pair(ctx, [user(instruction)], [assistant(chosen)], [assistant(rejected)],
                 label_source=label, annotators=[1], meta=meta)]


def _ae_outputs_detect(obj: Any) -> bool:
    return isinstance(obj, Mapping) and {"instruction", "output", "generator"} <= set(obj)


def _ae_outputs(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    obj = need_dict(obj, ctx)
    instruction = need(obj, "instruction", ctx)
    output = need(obj, "output", ctx) if ctx.kind == "sft" else opt(obj, "output", ctx)
    msgs = [user(instruction)] + ([assistant(output)] if output is not None else [])
    return [conversation(ctx, msgs, task="alpaca_eval", meta=meta_of(obj, {"instruction", "output"}))]


# ----------------------------------------------------------------------------- oasst trees
def _oasst_detect(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("prompt"), Mapping) and "message_tree_id" in obj


_OASST_DROP = ("text", "replies", "role", "rank", "labels", "emojis")


def _node_msg(node: Any, ctx: Ctx, path: str) -> Message:
    if not isinstance(node, Mapping):
        raise ctx.error("tree node is not an object.", field=path, expected="a message object", found=node)
    role, text = node.get("role"), node.get("text")
    if not isinstance(text, str):
        raise ctx.error("message without text.", field=f"{path}.text", expected="a string", found=text)
    if str(role).lower() not in ROLE_ALIASES:
        raise ctx.error("unknown role.", field=f"{path}.role", expected="prompter or assistant", found=role)
    return {"role": ROLE_ALIASES[str(role).lower()], "content": text}


def _ranked(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    replies = [r for r in node.get("replies") or [] if isinstance(r, Mapping) and not r.get("deleted")]
    return sorted((r for r in replies if isinstance(r.get("rank"), int)), key=lambda r: (r["rank"], str(r.get("message_id"))))


def _oasst(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    obj = need_dict(obj, ctx)
    root = need(obj, "prompt", ctx, dict, "the root message")
    tree_id = obj.get("message_tree_id")
    out: list[dict[str, Any]] = []
    if ctx.kind == "preference":
        stack: list[tuple[Mapping[str, Any], list[Message], str]] = [(root, [], "prompt")]
        while stack:
            node, above, path = stack.pop()
            history = above + [_node_msg(node, ctx, path)]
            ranked = _ranked(node)
            if len(ranked) >= 2:
                best, worst = ranked[0], ranked[-1]
                if best["rank"] == worst["rank"]:
                    raise Rejected("best and worst replies share a rank.", "rank")
                out.append(pair(ctx, history, [_node_msg(best, ctx, path + ".best")], [_node_msg(worst, ctx, path + ".worst")],
                                label_source="human", sid=node.get("message_id"),
                                meta={"message_tree_id": tree_id, "chosen_id": best.get("message_id"),
                                      "rejected_id": worst.get("message_id"), "chosen_rank": best["rank"],
                                      "rejected_rank": worst["rank"], "n_ranked": len(ranked)}))
            replies = node.get("replies") or []
            for i in range(len(replies) - 1, -1, -1):
                stack.append((replies[i], history, f"{path}.replies[{i}]"))
        return out
    # sft / target: follow the best reply (rank 0, or the only reply) from the root
    msgs, node, path = [], root, "prompt"
    while True:
        msgs.append(_node_msg(node, ctx, path))
        live = [r for r in node.get("replies") or [] if isinstance(r, Mapping) and not r.get("deleted")]
        ranked = _ranked(node)
        nxt = ranked[0] if ranked else (live[0] if len(live) == 1 else None)
        if nxt is None:
            break
        path += ".best"
        node = nxt
    while msgs and msgs[-1]["role"] != "assistant" and ctx.kind == "sft":
        msgs.pop()
    if not msgs:
        raise Rejected("tree has no assistant reply.", "prompt.replies")
    return [conversation(ctx, msgs, sid=tree_id, meta=meta_of(obj, {"prompt", "message_tree_id"}))]


FORMATS = [
    FormatInfo("pandalm", "PandaLM test set: response1/response2, 3 annotators -> majority (ties reported)",
               ("preference", "sft", "target"), "preference", _pandalm_detect, _pandalm),
    FormatInfo("alpaca_eval_annotations", "AlpacaEval judge annotations: output_1/output_2, preference 1/2 (ties reported)",
               ("preference", "sft", "target"), "preference", _ae_ann_detect, _ae_annotations),
    FormatInfo("alpaca_eval_outputs", "AlpacaEval model outputs: instruction/output/generator",
               ("sft", "target"), "sft", _ae_outputs_detect, _ae_outputs),
    FormatInfo("oasst_tree", "OpenAssistant message trees: best vs worst ranked sibling per node; kind sft: rank-0 path",
               ("preference", "sft", "target"), "preference", _oasst_detect, _oasst, ("jsonl", "json")),
]
