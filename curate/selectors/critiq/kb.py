"""The starter knowledge base of generic instruction-data criteria (docs/methods/critiq.md §13).

The paper's 342-criterion knowledge base is not public; these 22 criteria are the project's
default. A user knowledge base is a JSON list of ``{"name", "description"}`` objects.
"""

from __future__ import annotations

import json
from pathlib import Path

from curate.errors import SchemaError

STARTER_KB: tuple[tuple[str, str], ...] = (
    ("instruction_adherence", "The response does what the instruction asks and respects every explicit requirement and constraint in it."),
    ("factual_accuracy", "Facts, numbers, names and dates stated in the response are correct."),
    ("reasoning_validity", "Each step of an explanation or derivation follows from the previous ones, without gaps or contradictions."),
    ("final_answer_correctness", "For tasks with a definite answer, such as math or multiple choice, the final answer is right."),
    ("completeness", "Every part of the request is addressed; nothing is cut off or left as a placeholder."),
    ("conciseness", "The response has no padding, repetition or filler beyond what the task needs."),
    ("clarity_and_structure", "Ideas come in a readable order, with paragraphs, lists or headings where they help the reader."),
    ("code_executability", "Code would run as written: valid syntax, defined names, needed imports, sensible edge-case handling."),
    ("code_readability", "Code uses meaningful names and consistent style, and explains non-obvious behaviour in comments or docstrings."),
    ("honesty_about_uncertainty", "The response admits uncertainty or missing information instead of inventing details."),
    ("harmlessness", "The response avoids dangerous, illegal or hateful content and declines harmful requests with a useful alternative."),
    ("no_needless_refusal", "The response does not refuse, lecture or hedge when the request is benign."),
    ("instruction_clarity", "The instruction is well-posed, self-contained and answerable without hidden context."),
    ("task_complexity", "The instruction calls for real knowledge or several steps of work rather than a trivial lookup."),
    ("format_compliance", "Requested formats such as JSON, word limits, language, casing or markdown are followed exactly."),
    ("language_quality", "Grammar, spelling and fluency are correct in the language the user wrote in."),
    ("relevance", "Everything in the response bears on the request; there are no tangents or unrelated boilerplate."),
    ("self_containedness", "The response does not depend on resources the reader cannot see, such as \"see above\" or missing files."),
    ("internal_consistency", "The response does not contradict itself or the facts given in the prompt."),
    ("appropriate_depth", "The level of detail and technicality suits the question's difficulty and its likely audience."),
    ("no_generation_artifacts", "There are no truncated sentences, leaked template tokens, broken code fences or canned assistant disclaimers."),
    ("example_quality", "Examples or test cases, where given, are correct and actually illustrate the point being made."),
)


def load_kb(path: str | Path | None = None) -> list[tuple[str, str]]:
    """The knowledge base: :data:`STARTER_KB` when ``path`` is None, else a JSON list of
    ``{"name", "description"}`` objects (names unique)."""
    if path is None:
        return list(STARTER_KB)
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SchemaError(f"not valid JSON: {exc.msg}.", file=str(p), line=exc.lineno) from None
    if not isinstance(data, list):
        raise SchemaError("a knowledge base is a JSON list.", file=str(p), expected="[{name, description}, ...]",
                          found=type(data).__name__)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        ok = isinstance(item, dict) and all(isinstance(item.get(k), str) and item.get(k).strip()
                                            for k in ("name", "description"))
        if not ok:
            raise SchemaError("bad criterion.", file=str(p), line=i + 1, field="name/description",
                              expected="{name: str, description: str}", found=item)
        if item["name"] in seen:
            raise SchemaError("duplicated criterion name.", file=str(p), line=i + 1, field="name", found=item["name"])
        seen.add(item["name"])
        out.append((item["name"].strip(), item["description"].strip()))
    return out
