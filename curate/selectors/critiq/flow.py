"""The CritiQ Flow: mining verbal quality criteria from ~30 human preference pairs.

Implements docs/methods/critiq.md §2-§5 after "CritiQ: Mining Data Quality Criteria from Human
Preferences" (Guo et al., ACL 2025, arXiv 2502.19279): knowledge-base retrieval, manager
warm-up, per-(pair, criterion) worker judgments, accuracy over non-abstentions, majority vote,
triage (good ≥ 0.75 kept, mid refined by reflection on wrong cases, low ≤ 0.5 banned and
replaced), best version per name, final criteria ≥ 0.75.

Deviations from the reference code (docs/methods/critiq.md §10): reflection and refine prompts carry the real
description (the reference shows "Description: None"); refined descriptions are assembled by
name, never by completion order; a final parse failure is an ``invalid`` result; KB ties are
broken by name, not at random; the A/B swap stream is seeded by ``seed`` rather than a fixed
constant. Optional (off by default): workers may be asked with ``guided_choice`` — the reply is
restricted to ``{"answer": "A"}``, ``{"answer": "B"}`` or ``{"answer": "None"}`` (no thought) — so
that a small local judge that cannot write the JSON contract still gives valid votes. Also optional:
``swap`` asks every worker judgment in both orders and keeps only the verdicts that survive the
swap (:mod:`curate.selectors.critiq.swap`); the run's position-bias report is
``FlowResult.position_bias``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import param_error
from curate.selectors.critiq.judge import (
    BudgetExceeded,
    JudgeSession,
    WorkerResult,
    parse_criteria,
    parse_reflection,
    parse_worker,
)
from curate.selectors.critiq.prompts import (  # noqa: F401  (re-exported: the public names have always lived here)
    MANAGER_SYSTEM,
    SINGLE_CHOICES,
    WORKER_CHOICES,
    WORKER_SYSTEM,
    Criterion,
    Pair,
    _cut,
    _texts_block,
    parse_worker_prompt,
    single_prompt_messages,
    worker_messages,
)
from curate.selectors.critiq.swap import PositionLog, ask_in_orders


@dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """Parameters of the Flow (docs/methods/critiq.md §3, §5).

    Attributes:
        n_criteria: criteria in the initial set (paper 20; the reference code's default is 10).
        epochs: refinement epochs (paper 3 / 5 / 3 for code / math / logic).
        thresholds: (low, high): acc ≤ low is banned, acc ≥ high is good, between is refined.
        retrieval_threshold: KB criteria need accuracy strictly above this.
        max_retries: re-asks after a parse failure, and re-asks for missing new criteria.
        voting_threshold: majority vote predicts A when #A − #B > this, B when < −this.
        max_reflections_per_criterion: wrong cases reflected on per mid criterion.
        max_chars_manager: each text in a manager prompt is cut to this many characters.
        max_chars_worker: each text in a worker prompt is cut to this many characters.
        worker_temperature / manager_temperature: 0.0 and 1.0 as in the paper.
        worker_max_tokens / manager_max_tokens: reply lengths.
        max_llm_calls: optional cap on fresh calls, checked before each phase (BudgetExceeded).
        max_workers: worker calls in flight.
        seed: A/B swap stream and the manager's sampling seed.
        worker_guided_choice: ask workers with ``guided_choice=WORKER_CHOICES`` (the endpoint must
            support it: vLLM, ``curate judge serve``, any server that takes the judge's
            ``choice_format``, which is a setting of the judge client, not of the Flow); the
            manager always writes free text.
        swap: ask every worker judgment in both orders and keep only verdicts that survive the
            swap (curate.selectors.critiq.swap); doubles the worker calls. The manager gives no
            A/B verdicts, so it has nothing to swap.
    """

    n_criteria: int = 20
    epochs: int = 3
    thresholds: tuple[float, float] = (0.5, 0.75)
    retrieval_threshold: float = 0.5
    max_retries: int = 3
    voting_threshold: int = 0
    max_reflections_per_criterion: int = 10
    max_chars_manager: int = 6000
    max_chars_worker: int = 20000
    worker_temperature: float = 0.0
    manager_temperature: float = 1.0
    worker_max_tokens: int = 1024
    manager_max_tokens: int = 2048
    max_llm_calls: int | None = None
    max_workers: int = 4
    seed: int = 0
    worker_guided_choice: bool = False
    swap: bool = False

    def __post_init__(self) -> None:
        o = "CritiQFlow"
        for name, lo in (("n_criteria", 1), ("epochs", 0), ("max_retries", 0), ("voting_threshold", 0),
                         ("max_reflections_per_criterion", 0), ("max_chars_manager", 1), ("max_chars_worker", 1),
                         ("worker_max_tokens", 1), ("manager_max_tokens", 1), ("max_workers", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise param_error(o, name, f"an integer >= {lo}", v)
        t = self.thresholds
        if not (isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(x, (int, float)) for x in t)
                and 0.0 <= t[0] < t[1] <= 1.0):
            raise param_error(o, "thresholds", "(low, high) with 0 <= low < high <= 1", t)
        if not isinstance(self.retrieval_threshold, (int, float)) or not 0.0 <= self.retrieval_threshold < 1.0:
            raise param_error(o, "retrieval_threshold", "in [0, 1)", self.retrieval_threshold)
        for name in ("worker_temperature", "manager_temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 2.0:
                raise param_error(o, name, "in [0, 2]", v)
        for name in ("worker_guided_choice", "swap"):
            if not isinstance(getattr(self, name), bool):
                raise param_error(o, name, "true or false", getattr(self, name))
        m = self.max_llm_calls
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise param_error(o, "max_llm_calls", "an integer >= 1 or None", m)


# --------------------------------------------------------------------------- manager prompts
def _propose_text(k: int, taken: Sequence[str], rejected: Sequence[str] = ()) -> str:
    text = (
        f"TASK: propose {k}\nWrite {k} new data-quality criteria that explain the human preferences. Each "
        "description says what the criterion measures, how to judge it and when it does not apply. "
        f"Names must differ from these: {json.dumps(sorted(taken))}.\n"
    )
    if rejected:
        text += f"These names were rejected because they repeat banned or existing criteria: {json.dumps(sorted(rejected))}.\n"
    return text + 'Reply with only a JSON object {"<name>": "<description>", ...}.'


def _explain_text(pair: Pair, n: int) -> str:
    return (
        "TASK: explain\nHere are two texts judged by a human.\n\n"
        f"{_texts_block(_cut(pair.text_a, n), _cut(pair.text_b, n))}\n\n"
        f"The better one is {pair.answer}. Explain which qualities make it better."
    )


def _report_text(current: Sequence[Criterion], good: Sequence[str]) -> str:
    lines = [f"- {c.name}: {c.accuracy:.4f}" for c in current]
    return ("Accuracy of each criterion against the human judgments:\n" + "\n".join(lines)
            + f"\nGood criteria (kept unchanged): {json.dumps(list(good))}\n\n")


def _reflect_text(c: Criterion, pair: Pair, res: WorkerResult, lo: float, hi: float, n: int) -> str:
    return (
        f"TASK: reflect\nThe criterion below has an accuracy between {lo} and {hi}: useful, but it misled the "
        f"worker on this pair.\n\n[Criterion name]\n{c.name}\n[Criterion description]\n{c.description}\n\n"
        f"{_texts_block(_cut(pair.text_a, n), _cut(pair.text_b, n))}\n\n"
        f"The worker chose {res.vote}; the correct answer is {pair.answer}.\nWorker's thought: {res.thought}\n\n"
        "Analyse the mistake and write a critique: how should the description be reworded so that the worker "
        "judges correctly, or recognises when the criterion does not apply?\n"
        'Reply with only a JSON object {"analysis": "...", "critique": "..."}.'
    )


def _refine_text(c: Criterion, critiques: Sequence[str]) -> str:
    listed = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(critiques))
    return (
        f"TASK: refine\n[Criterion name]\n{c.name}\n[Criterion description]\n{c.description}\n\n"
        f"[Critiques]\n{listed}\n[End of Critiques]\n\nRewrite the description taking the critiques into account. "
        f'Keep the name. Reply with only a JSON object {{"{c.name}": "<improved description>"}}.'
    )


# --------------------------------------------------------------------------- scoring rules
def norm_name(name: str) -> str:
    """Case-folded, whitespace-normalised name (for banned/current comparisons)."""
    return " ".join(name.casefold().split())


def criterion_accuracy(results: Sequence[WorkerResult], pairs: Sequence[Pair]) -> tuple[float, bool]:
    """(accuracy, all_abstained): #correct / #(not abstained); invalid results count as wrong."""
    denom = sum(r.status != "abstain" for r in results)
    if denom == 0:
        return 0.0, True
    correct = sum(r.status == "ok" and r.vote == p.answer for r, p in zip(results, pairs, strict=True))
    return correct / denom, False


def majority_vote(results: Sequence[WorkerResult], threshold: int = 0) -> str | None:
    """A if #A − #B > threshold, B if < −threshold, else None (abstentions and invalid ignored)."""
    v = sum(r.vote == "A" for r in results if r.status == "ok") - sum(r.vote == "B" for r in results if r.status == "ok")
    if v > threshold:
        return "A"
    if v < -threshold:
        return "B"
    return None


def vote_accuracy(results: dict[str, list[WorkerResult]], pairs: Sequence[Pair], threshold: int = 0) -> float:
    """Accuracy of the majority vote over ``results`` (None counts as wrong)."""
    if not pairs:
        return 0.0
    names = sorted(results)
    hits = sum(majority_vote([results[n][i] for n in names], threshold) == p.answer for i, p in enumerate(pairs))
    return hits / len(pairs)


def triage(accuracy: float, thresholds: tuple[float, float] = (0.5, 0.75)) -> str:
    """``good`` (≥ high), ``low`` (≤ low) or ``mid``."""
    lo, hi = thresholds
    if accuracy >= hi:
        return "good"
    if accuracy <= lo:
        return "low"
    return "mid"


def update_best(best: dict[str, Criterion], c: Criterion) -> None:
    """Keep the highest-accuracy version per name; strictly greater replaces, ties keep the earlier."""
    if c.accuracy is None:
        return
    old = best.get(c.name)
    if old is None or c.accuracy > (old.accuracy or 0.0):
        best[c.name] = replace(c)


def swap_pairs(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """Swap each pair with probability ½ (seeded stream), so "A" is not always the better text."""
    u = np.random.default_rng(seed).random(len(pairs))
    return [p.swapped() if x < 0.5 else p for p, x in zip(pairs, u, strict=True)]


def judge_pairs(worker: JudgeSession, criteria: Sequence[Criterion], pairs: Sequence[Pair], *,
                temperature: float = 0.0, max_tokens: int = 1024, seed: int | None = 0,
                max_chars: int = 20000, max_workers: int = 4, phase: str = "judge",
                guided_choice: bool = False, swap: bool = False,
                log: PositionLog | None = None) -> dict[str, list[WorkerResult]]:
    """Every (pair, criterion) judged once — or, with ``swap``, in both orders and reconciled
    (:func:`~curate.selectors.critiq.swap.reconcile`: only a verdict that survives the swap counts,
    an order-dependent one becomes ``abstain``); results assembled by (criterion name, pair
    index). ``guided_choice`` restricts each reply to :data:`WORKER_CHOICES`; ``log`` collects the
    position-bias counts per criterion.

    Raises the first :class:`~curate.selectors.critiq.judge.JudgeError` after cancelling calls not
    yet started; finished calls are already in the cache.
    """
    by_name = {c.name: c for c in criteria}

    def one(name: str, i: int, swapped: bool) -> WorkerResult:
        pair = pairs[i].swapped() if swapped else pairs[i]
        parsed, raw = worker.ask_json(worker_messages(by_name[name], pair, max_chars), parse_worker,
                                      temperature=temperature, max_tokens=max_tokens, seed=seed, phase=phase,
                                      guided_choice=WORKER_CHOICES if guided_choice else None)
        return parsed if parsed is not None else WorkerResult(None, "invalid", "", raw)

    return ask_in_orders(one, [c.name for c in criteria], len(pairs), swap=swap, max_workers=max_workers, log=log)


def judge_single_prompt(worker: JudgeSession, pairs: Sequence[Pair], criteria: Sequence[Criterion] | None = None, *,
                        temperature: float = 0.0, max_tokens: int = 1024, seed: int | None = 0,
                        max_chars: int = 20000, max_workers: int = 4, phase: str = "single_prompt",
                        guided_choice: bool = False, swap: bool = False,
                        log: PositionLog | None = None) -> list[WorkerResult]:
    """One call per pair (two with ``swap``, reconciled as in :func:`judge_pairs`; an
    order-dependent verdict becomes ``abstain`` although the prompt demands A or B): all
    ``criteria`` in one prompt, or the vanilla judge when None. ``guided_choice`` restricts each
    reply to :data:`SINGLE_CHOICES` (A or B); ``log`` records under the name ``phase``."""
    def one(_name: str, i: int, swapped: bool) -> WorkerResult:
        pair = pairs[i].swapped() if swapped else pairs[i]
        parsed, raw = worker.ask_json(single_prompt_messages(pair, criteria, max_chars), parse_worker,
                                      temperature=temperature, max_tokens=max_tokens, seed=seed, phase=phase,
                                      guided_choice=SINGLE_CHOICES if guided_choice else None)
        return parsed if parsed is not None else WorkerResult(None, "invalid", "", raw)

    return ask_in_orders(one, [phase], len(pairs), swap=swap, max_workers=max_workers, log=log)[phase]


def prediction_accuracy(results: Sequence[WorkerResult], pairs: Sequence[Pair]) -> float:
    """Share of pairs whose vote equals the answer (abstentions and invalid count as wrong)."""
    return sum(r.vote == p.answer for r, p in zip(results, pairs, strict=True)) / max(len(pairs), 1)


# --------------------------------------------------------------------------- result
@dataclass
class FlowResult:
    """What :meth:`CritiQFlow.run` returns; :meth:`save` writes it as JSON (atomic)."""

    criteria: list[Criterion]
    best: dict[str, Criterion]
    history: list[dict[str, Any]]
    calls: dict[str, Any]
    vote_accuracy: float
    validation: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    judges: dict[str, str] = field(default_factory=dict)
    position_bias: dict[str, Any] = field(default_factory=dict)

    def criteria_json(self) -> str:
        """The final criteria as canonical JSON (byte-stable across cached reruns)."""
        return json.dumps([c.as_dict() for c in self.criteria], sort_keys=True, ensure_ascii=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "criteria": [c.as_dict() for c in self.criteria],
            "vote_accuracy": self.vote_accuracy,
            "validation": self.validation,
            "best": {k: v.as_dict() for k, v in sorted(self.best.items())},
            "history": self.history,
            "calls": self.calls,
            "config": self.config,
            "judges": self.judges,
            "position_bias": self.position_bias,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        from curate.io.writers import write_json

        return write_json(self.as_dict(), path, sort_keys=True, ensure_ascii=False)


def load_criteria(path: str | os.PathLike[str]) -> list[Criterion]:
    """Final criteria from a Flow JSON file (or a plain ``{name: description}`` object)."""
    from curate.errors import SchemaError

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SchemaError(f"not valid JSON: {exc.msg}.", file=str(p), line=exc.lineno) from None
    if isinstance(data, dict) and "criteria" in data:
        items = data["criteria"]
        if not isinstance(items, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                  and isinstance(c.get("description"), str) for c in items):
            raise SchemaError("bad criteria list.", file=str(p), field="criteria",
                              expected="[{name, description, ...}]", found=items)
        return [Criterion(c["name"], c["description"], int(c.get("version", 0)), c.get("accuracy")) for c in items]
    if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        return [Criterion(k, v) for k, v in data.items()]
    raise SchemaError("not a criteria file.", file=str(p), expected="a CritiQ Flow JSON or {name: description}",
                      found=type(data).__name__)


# --------------------------------------------------------------------------- the flow
class CritiQFlow:
    """The CritiQ Flow (docs/methods/critiq.md §3). ``worker`` and ``manager`` are separate :class:`JudgeSession`s.

    Args:
        worker: judges (pair, criterion) at ``worker_temperature``.
        manager: writes, reflects on and refines criteria at ``manager_temperature``.
        config: :class:`FlowConfig`.
        kb: the knowledge base as (name, description) pairs; None or [] skips retrieval.
        log: optional callable receiving progress lines.
    """

    def __init__(self, worker: JudgeSession, manager: JudgeSession, config: FlowConfig | None = None, *,
                 kb: Sequence[tuple[str, str]] | None = None, log: Callable[[str], None] | None = None) -> None:
        self.worker = worker
        self.manager = manager
        self.config = config or FlowConfig()
        self.kb = [Criterion(n, d) for n, d in (kb or [])]
        self.log = log or (lambda _msg: None)
        self.position = PositionLog(self.config.swap, worker.name)

    # ---- accounting
    def _fresh(self) -> int:
        n = self.worker.stats.n_fresh
        return n if self.manager is self.worker else n + self.manager.stats.n_fresh

    def _budget(self, phase: str, bound: int) -> None:
        cap = self.config.max_llm_calls
        if cap is not None and self._fresh() + bound > cap:
            raise BudgetExceeded(
                f"CritiQ phase '{phase}' needs up to {bound} LLM calls; {self._fresh()} of max_llm_calls={cap} "
                "are used. Raise max_llm_calls or reuse the cache."
            )

    def _evaluate(self, criteria: list[Criterion], pairs: Sequence[Pair], phase: str
                  ) -> dict[str, list[WorkerResult]]:
        self._budget(phase, len(criteria) * len(pairs) * (2 if self.config.swap else 1))
        cfg = self.config
        res = judge_pairs(self.worker, criteria, pairs, temperature=cfg.worker_temperature,
                          max_tokens=cfg.worker_max_tokens, seed=cfg.seed, max_chars=cfg.max_chars_worker,
                          max_workers=cfg.max_workers, phase=phase, guided_choice=cfg.worker_guided_choice,
                          swap=cfg.swap, log=self.position)
        for c in criteria:
            c.accuracy, c.all_abstained = criterion_accuracy(res[c.name], pairs)
        return res

    def _manager_json(self, messages: list[dict[str, str]], parse: Callable[[str], Any], phase: str,
                      round_: int = 0) -> Any:
        cfg = self.config
        # a re-ask round with an unchanged prompt needs its own seeds, else it replays round 0
        seed = cfg.seed + round_ * (self.manager.max_retries + 1)
        parsed, _raw = self.manager.ask_json(messages, parse, temperature=cfg.manager_temperature,
                                             max_tokens=cfg.manager_max_tokens, seed=seed, phase=phase)
        return parsed

    def _propose(self, context: list[dict[str, str]], k: int, taken: set[str], banned: set[str], prefix: str,
                 phase: str) -> list[Criterion]:
        """Ask for ``k`` new criteria; reject names equal (normalised) to banned or taken ones;
        re-ask up to ``max_retries`` times for the missing ones."""
        accepted: list[Criterion] = []
        rejected: list[str] = []
        seen = set(taken)
        for _round in range(self.config.max_retries + 1):
            need = k - len(accepted)
            if need <= 0:
                break
            shown = sorted({c for c in taken} | {c.name for c in accepted})
            msgs = context + [{"role": "user", "content": prefix + _propose_text(need, shown, rejected)}]
            got = self._manager_json(msgs, parse_criteria, phase, _round) or {}
            for name in sorted(got):  # deterministic, never completion order
                key = norm_name(name)
                if key in banned or key in seen:
                    if name not in rejected:
                        rejected.append(name)
                    continue
                if len(accepted) < k:
                    accepted.append(Criterion(name, got[name]))
                    seen.add(key)
        return accepted

    def _refine(self, c: Criterion, results: list[WorkerResult], pairs: Sequence[Pair],
                context: list[dict[str, str]], report: str, phase: str) -> Criterion:
        cfg = self.config
        lo, hi = cfg.thresholds
        wrong = [i for i, r in enumerate(results) if r.status == "ok" and r.vote != pairs[i].answer]
        wrong = wrong[: cfg.max_reflections_per_criterion]
        critiques = []
        for i in wrong:
            msgs = context + [{"role": "user", "content": report + _reflect_text(
                c, pairs[i], results[i], lo, hi, cfg.max_chars_manager)}]
            got = self._manager_json(msgs, parse_reflection, phase)
            if got is not None:
                critiques.append(got["critique"])
        if not critiques:
            return replace(c, accuracy=None, all_abstained=False)
        msgs = context + [{"role": "user", "content": report + _refine_text(c, critiques)}]
        got = self._manager_json(msgs, parse_criteria, phase)
        if not got:
            return replace(c, accuracy=None, all_abstained=False)
        desc = got[c.name] if c.name in got else got[sorted(got)[0]]  # the name is kept either way
        return Criterion(c.name, desc, c.version + 1)

    # ---- main loop
    def run(self, pairs: Sequence[Pair], *, valid_pairs: Sequence[Pair] | None = None) -> FlowResult:
        """Mine criteria from human ``pairs``; ``valid_pairs`` are evaluated and logged only."""
        cfg = self.config
        lo, hi = cfg.thresholds
        self.position = PositionLog(cfg.swap, self.worker.name)  # this run's judgments only
        pairs = swap_pairs(pairs, cfg.seed)
        history: list[dict[str, Any]] = []
        best: dict[str, Criterion] = {}
        banned: set[str] = set()

        # 1. knowledge-base retrieval
        current: list[Criterion] = []
        if self.kb:
            kb = [replace(c) for c in self.kb]
            self._evaluate(kb, pairs, "kb_retrieval")
            ok = [c for c in kb if c.accuracy is not None and c.accuracy > cfg.retrieval_threshold]
            ok.sort(key=lambda c: (-(c.accuracy or 0.0), c.name))
            current = [Criterion(c.name, c.description) for c in ok[: cfg.n_criteria]]
            history.append({"phase": "kb_retrieval",
                            "accuracy": {c.name: c.accuracy for c in sorted(kb, key=lambda c: c.name)},
                            "retrieved": [c.name for c in current]})
            self.log(f"kb: {len(current)} of {len(kb)} criteria above {cfg.retrieval_threshold}")

        # 2. manager warm-up
        request = [{"role": "system", "content": MANAGER_SYSTEM}]
        if len(current) < cfg.n_criteria:
            k = cfg.n_criteria - len(current)
            self._budget("warmup", len(pairs) + 1)
            conv = list(request)
            for p in pairs:
                conv.append({"role": "user", "content": _explain_text(p, cfg.max_chars_manager)})
                reply = self.manager.chat(conv, temperature=cfg.manager_temperature,
                                          max_tokens=cfg.manager_max_tokens, seed=cfg.seed, phase="warmup")
                conv.append({"role": "assistant", "content": reply})
            new = self._propose(conv, k, {norm_name(c.name) for c in current}, banned, "", "warmup")
            current += new
            history.append({"phase": "warmup", "proposed": [c.name for c in new]})
            self.log(f"warm-up: {len(new)} new criteria")

        # 3. epochs
        for epoch in range(cfg.epochs):
            phase = f"epoch_{epoch + 1}"
            res = self._evaluate(current, pairs, phase)
            for c in current:
                update_best(best, c)
            vacc = vote_accuracy(res, pairs, cfg.voting_threshold)
            groups: dict[str, list[Criterion]] = {"good": [], "mid": [], "low": []}
            for c in current:
                groups[triage(c.accuracy or 0.0, (lo, hi))].append(c)
            wrong_counts = {c.name: min(cfg.max_reflections_per_criterion,
                                        sum(r.status == "ok" and r.vote != p.answer for r, p in zip(res[c.name], pairs)))
                            for c in groups["mid"]}
            self._budget(f"{phase}_manager", (1 if groups["low"] else 0) + sum(n + 1 for n in wrong_counts.values()))
            context = request + [
                {"role": "user", "content": _propose_text(cfg.n_criteria, [])},
                {"role": "assistant", "content": json.dumps({c.name: c.description for c in current}, ensure_ascii=False)},
            ]
            report = _report_text(current, [c.name for c in groups["good"]])
            refined = [self._refine(c, res[c.name], pairs, context, report, f"{phase}_manager") for c in groups["mid"]]
            banned |= {norm_name(c.name) for c in groups["low"]}
            taken = {norm_name(c.name) for c in groups["good"] + groups["mid"]}
            new = (self._propose(context, len(groups["low"]), taken, banned, report, f"{phase}_manager")
                   if groups["low"] else [])
            history.append({
                "phase": phase,
                "criteria": [{**c.as_dict(), "triage": triage(c.accuracy or 0.0, (lo, hi))} for c in current],
                "vote_accuracy": vacc,
                "banned": sorted(banned),
                "refined": [c.name for c in refined],
                "new": [c.name for c in new],
            })
            self.log(f"{phase}: good {len(groups['good'])}, mid {len(groups['mid'])}, low {len(groups['low'])}, "
                     f"vote accuracy {vacc:.3f}")
            current = [replace(c, accuracy=None, all_abstained=False) for c in groups["good"]] + refined + new

        # 4. finish
        res = self._evaluate(current, pairs, "final")
        for c in current:
            update_best(best, c)
        final = sorted((replace(c) for c in best.values() if (c.accuracy or 0.0) >= hi),
                       key=lambda c: (-(c.accuracy or 0.0), c.name))
        final_res = {c.name: res[c.name] for c in current if c.name in {f.name for f in final}
                     and best[c.name].version == c.version}
        missing = [c for c in final if c.name not in final_res]
        if missing:  # best versions from earlier epochs: judge them again (cached when unchanged)
            final_res.update(self._evaluate([replace(c) for c in missing], pairs, "final_best"))
        vacc = vote_accuracy(final_res, pairs, cfg.voting_threshold) if final else 0.0
        history.append({"phase": "final", "criteria": [c.as_dict() for c in current],
                        "final": [c.name for c in final], "vote_accuracy": vacc})
        validation = None
        if valid_pairs and final:
            vp = swap_pairs(valid_pairs, cfg.seed + 1)
            vres = self._evaluate([replace(c) for c in final], vp, "validation")
            validation = {"vote_accuracy": vote_accuracy(vres, vp, cfg.voting_threshold),
                          "accuracy": {n: criterion_accuracy(r, vp)[0] for n, r in sorted(vres.items())}}
        for msg in self.position.warn():
            self.log(msg)
        calls = {"worker": self.worker.stats.as_dict()}
        if self.manager is not self.worker:
            calls["manager"] = self.manager.stats.as_dict()
        return FlowResult(final, best, history, calls, vacc, validation,
                          {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
                          {"worker": self.worker.name, "manager": self.manager.name}, self.position.report())
