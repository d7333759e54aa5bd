"""Evaluation / target sets and prompt-only sources.

Shapes as published: MMLU (Hendrycks et al., 2021; CSV without header: question, A-D, answer),
BIG-Bench Hard (Suzgun et al., 2022; ``{"examples": [{input, target}]}``), GSM8K (Cobbe et al.,
2021; ``question/answer`` with ``#### N``), IFEval (Zhou et al., 2023), HumanEval (Chen et al.,
2021), MT-bench / Vicuna-bench (Zheng et al., 2023; ``turns``), Arena-Hard (Li et al., 2024;
``turns[{content}]``), WizardLM test set (Xu et al., 2023), self-instruct seeds and
user-oriented instructions (Wang et al., 2023; ``instances``), OASST prompt lottery (JSON strings).

The target prompt is the user turn(s) only; the reference answer goes to ``answer`` when known.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from curate.io.formats._common import (
    Ctx,
    FormatInfo,
    assistant,
    conversation,
    join_prompt,
    meta_of,
    need,
    need_dict,
    opt,
    source_id,
    user,
)
from curate.schema import Message


def _has(obj: Any, *keys: str) -> bool:
    return isinstance(obj, Mapping) and all(k in obj for k in keys)


# ----------------------------------------------------------------------------- mmlu
_LETTERS = ("A", "B", "C", "D")
_SPLIT_SUFFIX = re.compile(r"_(dev|val|test|train)$")


def _mmlu_detect(obj: Any) -> bool:
    return isinstance(obj, list) and len(obj) == 6 and all(isinstance(c, str) for c in obj) and obj[5].strip() in _LETTERS


def mmlu_prompt(question: str, options: list[str]) -> str:
    """The MMLU question with its options, as in the original evaluation: ``Q\\nA. ..\\n..\\nAnswer:``."""
    lines = [question.strip()] + [f"{letter}. {opt_.strip()}" for letter, opt_ in zip(_LETTERS, options, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    if not isinstance(obj, list) or len(obj) != 6:
        raise ctx.error("bad MMLU row.", field="row", expected="6 columns: question, A, B, C, D, answer",
                        found=f"{len(obj) if isinstance(obj, list) else type(obj).__name__} columns")
    answer = obj[5].strip()
    if answer not in _LETTERS:
        raise ctx.error("bad MMLU answer.", field="answer (column 6)", expected="A, B, C or D", found=obj[5])
    subject = _SPLIT_SUFFIX.sub("", ctx.stem)
    return [conversation(ctx, [user(mmlu_prompt(obj[0], obj[1:5]))], answer=answer, task=f"mmlu/{subject}",
                         meta={"subject": subject, "choices": obj[1:5]})]


# ----------------------------------------------------------------------------- bbh
def _bbh_detect(obj: Any) -> bool:
    return _has(obj, "input", "target") and len(obj) <= 3


def _bbh(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    obj = need_dict(obj, ctx)
    inp, target = need(obj, "input", ctx), need(obj, "target", ctx)
    return [conversation(ctx, [user(inp)], answer=target, task=f"bbh/{ctx.stem}", meta=meta_of(obj, {"input", "target"}))]


# ----------------------------------------------------------------------------- gsm8k
def _gsm8k_detect(obj: Any) -> bool:
    return _has(obj, "question", "answer")


def _gsm8k(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    """``answer`` keeps the full worked solution; the number after ``####`` goes to meta ``final_answer``."""
    obj = need_dict(obj, ctx)
    q, a = need(obj, "question", ctx), need(obj, "answer", ctx)
    final = a.rsplit("####", 1)[1].strip() if "####" in a else None
    sid, id_key = source_id(obj)
    task = "gsm8k" if final is not None else ctx.stem
    return [conversation(ctx, [user(q)], answer=a, task=task, sid=sid,
                         meta=meta_of(obj, {"question", "answer", id_key}, final_answer=final))]


# ----------------------------------------------------------------------------- ifeval
def _ifeval_detect(obj: Any) -> bool:
    return _has(obj, "prompt", "instruction_id_list")


def _ifeval(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    obj = need_dict(obj, ctx)
    prompt = need(obj, "prompt", ctx)
    need(obj, "instruction_id_list", ctx, list, "a list of instruction ids")
    return [conversation(ctx, [user(prompt)], task="ifeval", sid=obj.get("key"), meta=meta_of(obj, {"prompt", "key"}))]


# ----------------------------------------------------------------------------- humaneval
def _humaneval_detect(obj: Any) -> bool:
    return _has(obj, "task_id", "prompt", "canonical_solution")


def _humaneval(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    obj = need_dict(obj, ctx)
    prompt, solution = need(obj, "prompt", ctx), need(obj, "canonical_solution", ctx)
    return [conversation(ctx, [user(prompt)], answer=solution, task="humaneval", sid=need(obj, "task_id", ctx),
                         meta=meta_of(obj, {"prompt", "canonical_solution", "task_id"}))]


# ----------------------------------------------------------------------------- mt-bench / arena-hard
def _mt_detect(obj: Any) -> bool:
    return _has(obj, "question_id", "turns") and isinstance(obj["turns"], list) and all(isinstance(t, str) for t in obj["turns"])


def _arena_detect(obj: Any) -> bool:
    return (_has(obj, "question_id", "turns") and isinstance(obj["turns"], list)
            and all(isinstance(t, Mapping) for t in obj["turns"]))


def _turns(obj: Mapping[str, Any], ctx: Ctx) -> list[str]:
    turns = need(obj, "turns", ctx, list, "a list of user turns")
    out = []
    for i, t in enumerate(turns):
        text = t.get("content") if isinstance(t, Mapping) else t
        if not isinstance(text, str):
            raise ctx.error("bad turn.", field=f"turns[{i}]", expected="a string or {content: str}", found=t)
        out.append(text)
    if not out:
        raise ctx.error("no turns.", field="turns", expected="at least one turn", found=turns)
    return out


def _multi_turn(obj: Any, ctx: Ctx, task: str) -> list[dict[str, Any]]:
    """All user turns form the target prompt; MT-bench ``reference`` answers (when present) are
    joined into ``answer`` (and interleaved as assistant turns for kind sft)."""
    obj = need_dict(obj, ctx)
    turns = _turns(obj, ctx)
    refs = opt(obj, "reference", ctx, list, "a list of reference answers")
    msgs: list[Message] = [user(t) for t in turns]
    answer = None
    if refs and all(isinstance(r, str) for r in refs):
        answer = "\n\n".join(refs)
        if ctx.kind == "sft" and len(refs) == len(turns):
            msgs = [m for t, r in zip(turns, refs, strict=True) for m in (user(t), assistant(r))]
            answer = None
    return [conversation(ctx, msgs, answer=answer, task=task, sid=obj.get("question_id"),
                         meta=meta_of(obj, {"turns", "question_id"}))]


def _mt(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    return _multi_turn(obj, ctx, ctx.stem.removesuffix("_question") or "mt_bench")


def _arena(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    return _multi_turn(obj, ctx, "arena_hard")


# ----------------------------------------------------------------------------- self-instruct
def _si_detect(obj: Any) -> bool:
    return _has(obj, "instruction", "instances") and "motivation_app" not in obj


def _si_eval_detect(obj: Any) -> bool:
    return _has(obj, "instruction", "instances", "motivation_app")


def _self_instruct(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    """One row per instance: instruction (+ instance input) -> instance output."""
    obj = need_dict(obj, ctx)
    instruction = need(obj, "instruction", ctx)
    instances = need(obj, "instances", ctx, list, "a list of {input, output}")
    if not instances:
        raise ctx.error("no instances.", field="instances", expected="at least one {input, output}", found=instances)
    sid, id_key = source_id(obj)
    out = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, Mapping):
            raise ctx.error("bad instance.", field=f"instances[{i}]", expected="{input, output}", found=inst)
        inp = opt(inst, "input", ctx)
        output = opt(inst, "output", ctx)
        if output is None and ctx.kind == "sft":
            raise ctx.error("missing field.", field=f"instances[{i}].output", expected="a string", found="nothing")
        meta = meta_of(obj, {"instruction", "instances", id_key}, instance=i if len(instances) > 1 else None)
        msgs = [user(join_prompt(instruction, inp))] + ([assistant(output)] if output is not None else [])
        out.append(conversation(ctx, msgs, task=ctx.stem, sid=sid, meta=meta))
    return out


# ----------------------------------------------------------------------------- prompts only
def _prompts_detect(obj: Any) -> bool:
    return isinstance(obj, str) or (_has(obj, "text") and len(obj) <= 2 and isinstance(obj.get("text"), str))


def _prompts(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    text = obj if isinstance(obj, str) else need(need_dict(obj, ctx), "text", ctx)
    if not text.strip():
        raise ctx.error("empty prompt.", field="text", expected="a non-empty string", found=text)
    meta = None if isinstance(obj, str) else meta_of(obj, {"text"})
    return [conversation(ctx, [user(text)], task=ctx.stem, meta=meta)]


_INSTR_KEYS = ("instruction", "Instruction", "prompt", "question")


def _instructions_detect(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(obj.get(k), str) for k in _INSTR_KEYS)


def _instructions(obj: Any, ctx: Ctx) -> list[dict[str, Any]]:
    """Instruction-only rows (WizardLM test set ``Instruction``, or ``instruction``/``prompt``) -> targets."""
    obj = need_dict(obj, ctx)
    for side, other in (("chosen", "rejected"), ("rejected", "chosen")):
        if side in obj:  # half a preference pair: reading it as a prompt would drop the reply silently
            need(obj, other, ctx, (str, list), f"'{other}' beside '{side}' (a preference pair)")
    key = next((k for k in _INSTR_KEYS if k in obj), "instruction")
    text = need(obj, key, ctx)
    inp = opt(obj, "input", ctx)
    sid, id_key = source_id(obj)
    task = "wizardlm" if key == "Instruction" and "Skill" in obj else ctx.stem
    return [conversation(ctx, [user(join_prompt(text, inp))], task=task, sid=sid,
                         meta=meta_of(obj, {key, "input", id_key}))]


_T = ("target", "sft")
FORMATS = [
    FormatInfo("self_instruct_eval", "self-instruct user-oriented instructions (instances; evaluation set)",
               ("target", "sft"), "target", _si_eval_detect, _self_instruct),
    FormatInfo("self_instruct", "self-instruct seed tasks: instruction + instances[{input, output}]",
               ("sft", "target"), "sft", _si_detect, _self_instruct),
    FormatInfo("humaneval", "HumanEval: task_id/prompt/canonical_solution", _T, "target", _humaneval_detect, _humaneval),
    FormatInfo("ifeval", "IFEval: key/prompt/instruction_id_list/kwargs", ("target",), "target", _ifeval_detect, _ifeval),
    FormatInfo("mt_bench", "MT-bench / Vicuna-bench questions: question_id/category/turns (reference kept)",
               _T, "target", _mt_detect, _mt),
    FormatInfo("arena_hard", "Arena-Hard questions: question_id/turns[{content}]", ("target",), "target", _arena_detect, _arena),
    FormatInfo("bbh", "BIG-Bench Hard: {examples: [{input, target}]}, task bbh/<file>", _T, "target", _bbh_detect, _bbh),
    FormatInfo("gsm8k", "GSM8K question/answer (any question/answer file)", _T, "target", _gsm8k_detect, _gsm8k),
    FormatInfo("mmlu", "MMLU CSV without header: question,A,B,C,D,answer; task mmlu/<subject>", _T, "target",
               _mmlu_detect, _mmlu, ("csv",)),
    FormatInfo("prompts", "prompt-only lines: JSON strings or {text} (OASST prompt lottery)", ("target",), "target",
               _prompts_detect, _prompts),
    FormatInfo("instructions", "instruction-only rows (WizardLM test set, instruction/prompt without output)",
               ("target",), "target", _instructions_detect, _instructions),
]
