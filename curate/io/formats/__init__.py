"""Source formats, in detection order (most specific shape first; generic fallbacks last)."""

from __future__ import annotations

from curate.io.formats import chat, judged, targets
from curate.io.formats._common import Ctx, FormatInfo, Rejected

_ALL = {f.name: f for f in judged.FORMATS + chat.FORMATS + targets.FORMATS}
_ORDER = (
    "oasst_tree", "pandalm", "alpaca_eval_annotations", "hh_rlhf", "trl", "sharegpt_preference", "sharegpt",
    "messages", "self_instruct_eval", "self_instruct", "alpaca_eval_outputs", "humaneval", "ifeval", "mt_bench",
    "arena_hard", "bbh", "gsm8k", "mmlu", "prompts", "alpaca", "instructions",
)
#: name -> :class:`FormatInfo`, in the order :func:`curate.io.detect_format` tries them.
FORMATS: dict[str, FormatInfo] = {name: _ALL[name] for name in _ORDER}

__all__ = ["FORMATS", "Ctx", "FormatInfo", "Rejected"]
