"""Deterministic test doubles for CritiQ (docs/methods/critiq.md §12): a rule-based worker whose answers
depend on a hidden quality rule, a scripted manager, the synthetic Python-function task, and an
adapter that turns any backend into a :class:`~curate.selectors.critiq.judge.Judge`.

Backends here have the server signature ``(messages, params) -> str``, so the same object runs
in-process (:class:`BackendJudge`) or behind the real HTTP server
(:class:`~curate.selectors.critiq.server.LocalServer`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from typing import Any

import numpy as np

from curate.selectors.critiq.flow import Pair, parse_worker_prompt
from curate.selectors.critiq.judge import parse_worker

_TEXT_RE = re.compile(r"\[Text A\]\n(?P<a>.*?)\n\[End of Text A\]\n\n\[Text B\]\n(?P<b>.*?)\n\[End of Text B\]", re.S)


def has_docstring(text: str) -> bool:
    return '"""' in text


def has_type_hints(text: str) -> bool:
    return "->" in text


class BackendJudge:
    """A backend ``(messages, params) -> str`` as an in-process Judge named ``name``."""

    def __init__(self, backend: Any, name: str) -> None:
        self.backend = backend
        self.name = name
        self.n_calls = 0
        self._lock = threading.Lock()

    @property
    def supports_guided_choice(self) -> bool:
        return bool(getattr(self.backend, "supports_guided_choice", False))

    def chat(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
             seed: int | None, guided_choice: list[str] | None = None) -> str:
        with self._lock:
            self.n_calls += 1
        params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
        if guided_choice is not None:
            params["guided_choice"] = list(guided_choice)
        return self.backend(messages, params)


def _h(*parts: str) -> float:
    d = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(d[:8], "big") / 2**64


class RuleJudge:
    """Worker backend: "docstring" in the description → compare docstring presence; "type hint" →
    compare hints; both → compare their sum (None when equal); otherwise a hash of (pair, criterion): 30% None, 50% A, 20% B."""

    def __call__(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        got = parse_worker_prompt(messages)
        if got is None:  # single-prompt / vanilla judge: hash of the pair, A or B
            m = _TEXT_RE.search(messages[-1]["content"])
            a, b = (m["a"], m["b"]) if m else ("", "")
            ans = "A" if _h("single", a, b) < 0.5 else "B"
            return json.dumps({"analysis_a": "", "analysis_b": "", "thought": "coin", "answer": ans})
        desc, a, b = got["desc"].lower(), got["a"], got["b"]
        checks = [(f, w) for f, w, key in ((has_docstring, "docstring", "docstring"),
                                           (has_type_hints, "type hints", "type hint")) if key in desc]
        if not checks:
            u = _h(got["name"], a, b)
            ans = "None" if u < 0.3 else ("A" if u < 0.8 else "B")
            return json.dumps({"analysis_a": "", "analysis_b": "", "thought": f"hunch {u:.3f}", "answer": ans})
        fa, fb = sum(f(a) for f, _ in checks), sum(f(b) for f, _ in checks)
        what = " and ".join(w for _, w in checks)
        ans = "None" if fa == fb else ("A" if fa > fb else "B")
        return ("Sure. " + json.dumps({"analysis_a": f"{what}: {fa}", "analysis_b": f"{what}: {fb}",
                                       "thought": f"compared {what}", "answer": ans}) + " Done.")


class GuidedRule(RuleJudge):
    """:class:`RuleJudge` answering through ``guided_choice``: its vote as one of the allowed replies
    (``{"answer": "A"}`` ...); records the choice lists it was given and the request forms they came
    in (``params["choice_format"]``, set by the server; None in process)."""

    supports_guided_choice = True

    def __init__(self) -> None:
        self.choices_seen: set[tuple[str, ...]] = set()
        self.forms_seen: set[str | None] = set()

    def __call__(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        reply = super().__call__(messages, params)
        choices = params.get("guided_choice")
        if choices is None:
            return reply
        self.choices_seen.add(tuple(choices))
        self.forms_seen.add(params.get("choice_format"))
        vote = parse_worker(reply).vote or "None"
        return next(c for c in choices if json.loads(c)["answer"] == vote)


class PositionJudge:
    """Worker backend with a pure position bias: answers ``letter`` whatever the texts (what a
    small local judge did on real pairs). Counts its calls."""

    def __init__(self, letter: str = "A") -> None:
        self.letter = letter
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        with self._lock:
            self.calls += 1
        return json.dumps({"thought": "first is best", "answer": self.letter})


class ContentJudge:
    """Backend that answers by content only, for worker and single-prompt judges alike: the text
    with more of (docstring, type hints) wins; a tie is "None" for a worker and, for the
    single-prompt judge that must choose, the text with the smaller hash (order-free)."""

    def __call__(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        m = _TEXT_RE.search(messages[-1]["content"])
        a, b = (m["a"], m["b"]) if m else ("", "")
        fa, fb = has_docstring(a) + has_type_hints(a), has_docstring(b) + has_type_hints(b)
        if fa != fb:
            ans = "A" if fa > fb else "B"
        elif parse_worker_prompt(messages) is not None or a == b:
            ans = "None"
        else:
            ans = "A" if _h("tie", a) < _h("tie", b) else "B"
        return json.dumps({"thought": f"{fa} vs {fb}", "answer": ans})


DEFAULT_POOL: tuple[tuple[str, str], ...] = (
    ("naming", "Prefer functions whose names describe what they do."),
    ("brevity", "Prefer the shorter function."),
    ("error_handling", "Prefer functions that handle invalid input."),
    ("pure_functions", "Prefer functions without side effects."),
    ("comments", "Prefer functions with inline comments."),
    ("typing_hint", "Prefer functions with type hint annotations on arguments and return values."),
    ("constants", "Prefer functions without magic numbers."),
    ("loops", "Prefer comprehensions over explicit loops."),
    ("returns", "Prefer a single return statement."),
    ("formatting", "Prefer consistent indentation and spacing."),
    ("imports", "Prefer functions that need no imports."),
    ("recursion", "Prefer iterative over recursive code."),
    ("testing", "Prefer functions that are easy to test."),
    ("generality", "Prefer functions that generalise to more inputs."),
    ("efficiency", "Prefer functions with lower time complexity."),
    ("idioms", "Prefer idiomatic Python."),
    ("argument_count", "Prefer functions with few arguments."),
    ("logging", "Prefer functions that log their work."),
    ("globals", "Prefer functions that use no global state."),
    ("determinism", "Prefer deterministic functions."),
)


class ScriptedManager:
    """Manager backend: proposes names from a fixed pool in order; reflections always critique with
    "docstring"; refine appends a docstring check to the real description it was shown.

    Args:
        pool: (name, description) pairs proposed in order.
        repeat: if True every proposal also repeats the first name it ever proposed, upper-cased
            (the Flow must reject it once that name is banned or current).
    """

    def __init__(self, pool: tuple[tuple[str, str], ...] = DEFAULT_POOL, *, repeat: bool = True) -> None:
        self.pool = list(pool)
        self.next = 0
        self.repeat = repeat
        self.proposed: list[str] = []
        self.prompts: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        text = messages[-1]["content"]
        with self._lock:
            self.prompts.append(text)
            if "TASK: explain" in text:
                return "The better text documents the function more clearly."
            if "TASK: reflect" in text:
                return json.dumps({"analysis": "the worker ignored documentation",
                                   "critique": "Mention whether the function has a docstring and type hints."})
            if "TASK: refine" in text:
                name = re.search(r"\[Criterion name\]\n(.*?)\n", text).group(1)  # type: ignore[union-attr]
                desc = re.search(r"\[Criterion description\]\n(.*?)\n\n", text, re.S).group(1)  # type: ignore[union-attr]
                return json.dumps({name: desc + " Check whether each function has a docstring and type hints."})
            m = re.search(r"TASK: propose (\d+)", text)
            if m:
                k = int(m.group(1))
                taken_m = re.search(r"Names must differ from these: (\[.*?\])", text)
                taken = {n.casefold() for n in json.loads(taken_m.group(1))} if taken_m else set()
                out: dict[str, str] = {}
                if self.repeat and self.proposed:
                    out[self.proposed[0].upper()] = "A repeated criterion."
                while len(out) < k + (1 if self.repeat and self.proposed else 0) and self.next < len(self.pool):
                    name, desc = self.pool[self.next]
                    self.next += 1
                    if name.casefold() not in taken:
                        out[name] = desc
                        self.proposed.append(name)
                return json.dumps(out)
            return "I do not understand."


def synthetic_functions(n: int = 200, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` short Python functions with hidden features; quality = docstring + hints + 0.1·noise."""
    rng = np.random.default_rng(seed)
    texts, quality = [], []
    for i in range(n):
        doc, hint = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        sig = f"def f{i}(x: int, y: int) -> int:" if hint else f"def f{i}(x, y):"
        body = f'    """Combine x and y (variant {i})."""\n' if doc else ""
        body += f"    return x * {i % 7 + 1} + y - {i % 5}\n"
        texts.append(f"{sig}\n{body}")
        quality.append(doc + hint + 0.1 * rng.normal())
    return texts, np.asarray(quality)


def synthetic_pairs(texts: list[str], quality: np.ndarray, n_pairs: int = 30, seed: int = 0) -> list[Pair]:
    """Human pairs: the better side has higher hidden quality (A is always the better one here;
    the Flow swaps)."""
    rng = np.random.default_rng(seed + 1)
    out: list[Pair] = []
    used: set[tuple[int, int]] = set()
    while len(out) < n_pairs:
        i, j = (int(x) for x in rng.choice(len(texts), 2, replace=False))
        if (i, j) in used or quality[i] == quality[j]:
            continue
        used.add((i, j))
        if quality[i] < quality[j]:
            i, j = j, i
        out.append(Pair(f"r{i}", f"r{j}", texts[i], texts[j], "A"))
    return out
