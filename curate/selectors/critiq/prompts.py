"""Data types and judge prompts of CritiQ (docs/methods/critiq.md §3): the pair and criterion
types, the stateless worker prompt (one criterion, two texts) and the single-prompt judge.

Kept apart from the Flow so that the prompt a judge sees is defined in one place; every name is
re-exported by :mod:`curate.selectors.critiq.flow`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# The replies a guided worker may give (vLLM ``guided_choice``); the single-prompt judge must choose.
WORKER_CHOICES = ('{"answer": "A"}', '{"answer": "B"}', '{"answer": "None"}')
SINGLE_CHOICES = WORKER_CHOICES[:2]


# --------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class Pair:
    """Two texts and which one is better (``answer`` "A" or "B")."""

    a_id: str
    b_id: str
    text_a: str
    text_b: str
    answer: str

    def swapped(self) -> Pair:
        return Pair(self.b_id, self.a_id, self.text_b, self.text_a, "B" if self.answer == "A" else "A")


@dataclass
class Criterion:
    """A named criterion; ``version`` counts refinements; ``accuracy`` None until evaluated."""

    name: str
    description: str
    version: int = 0
    accuracy: float | None = None
    all_abstained: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- prompts
WORKER_SYSTEM = "You are a careful, impartial data-quality annotator. You reply with JSON only."
MANAGER_SYSTEM = (
    "You are an expert in data quality for training language models. You study pairs of texts judged "
    "by humans and write verbal quality criteria that explain the human preferences."
)
_WORKER_RE = re.compile(
    r"\[Criterion name\]\n(?P<name>.*?)\n\[Criterion description\]\n(?P<desc>.*?)\n\n"
    r"\[Text A\]\n(?P<a>.*?)\n\[End of Text A\]\n\n\[Text B\]\n(?P<b>.*?)\n\[End of Text B\]",
    re.S,
)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + " …[truncated]"


def _texts_block(a: str, b: str) -> str:
    return f"[Text A]\n{a}\n[End of Text A]\n\n[Text B]\n{b}\n[End of Text B]"


def worker_messages(criterion: Criterion, pair: Pair, max_chars: int = 20000) -> list[dict[str, str]]:
    """The stateless worker prompt for one (pair, criterion) (docs/methods/critiq.md §3 step 4)."""
    user = (
        "Compare two texts with respect to ONE quality criterion.\n\n"
        f"[Criterion name]\n{criterion.name}\n[Criterion description]\n{criterion.description}\n\n"
        f"{_texts_block(_cut(pair.text_a, max_chars), _cut(pair.text_b, max_chars))}\n\n"
        "Which text is better with respect to this criterion? Answer \"None\" if the criterion does not "
        "apply to these texts, if both are equally good, or if you are unsure.\n"
        'Reply with only a JSON object: {"analysis_a": "...", "analysis_b": "...", "thought": "...", '
        '"answer": "A" or "B" or "None"}'
    )
    return [{"role": "system", "content": WORKER_SYSTEM}, {"role": "user", "content": user}]


def parse_worker_prompt(messages: list[dict[str, str]]) -> dict[str, str] | None:
    """(name, desc, a, b) of a worker prompt made by :func:`worker_messages` (for test backends)."""
    m = _WORKER_RE.search(messages[-1]["content"])
    return None if m is None else m.groupdict()


def single_prompt_messages(pair: Pair, criteria: Sequence[Criterion] | None = None,
                           max_chars: int = 20000) -> list[dict[str, str]]:
    """One prompt with every criterion (the "without voting" ablation) or, with no criteria, the
    vanilla "which is better?" judge."""
    if criteria:
        crit = "\n".join(f"- {c.name}: {c.description}" for c in criteria)
        head = f"Compare two texts using ALL of these quality criteria together.\n\n[Criteria]\n{crit}\n[End of Criteria]"
    else:
        head = "Compare two texts and decide which one is of higher quality overall."
    user = (
        f"{head}\n\n{_texts_block(_cut(pair.text_a, max_chars), _cut(pair.text_b, max_chars))}\n\n"
        "Which text is better? You must choose A or B.\n"
        'Reply with only a JSON object: {"analysis_a": "...", "analysis_b": "...", "thought": "...", '
        '"answer": "A" or "B"}'
    )
    return [{"role": "system", "content": WORKER_SYSTEM}, {"role": "user", "content": user}]
