"""Asking a pairwise judge in both orders, and measuring its position bias.

An LLM judge shown "[Text A] … [Text B]" may prefer a position rather than a text: small models
often answer "A" whatever they read (Zheng et al., "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena", NeurIPS 2023, §3.3; Wang et al., "Large Language Models are not Fair
Evaluators", ACL 2024). Swap mode asks every pairwise question twice, once with the texts in the
given order and once swapped, and keeps only verdicts that survive the swap.

Reconciliation (:func:`reconcile`). Let ``v₁`` be the verdict on (x, y) and ``v₂`` the verdict on
(y, x). The swapped verdict is first mapped back to the original order, ``m(A) = B``,
``m(B) = A``, ``m(None) = None``; then

* either reply invalid (unparseable after re-asks) → ``invalid`` (a broken contract stays visible);
* ``v₁ = m(v₂) ∈ {A, B}`` → that verdict, status ``ok`` (consistent);
* ``v₁ = m(v₂) = None`` → ``abstain`` (consistent abstention);
* otherwise (A then A, B then B, one vote and one "None") → ``abstain``: the judge's answer
  depends on the order, so it says nothing about the texts and counts as a tie.

Per criterion the run reports, over the raw calls (both orders when swapping):

* position-bias rate ``#A / (#A + #B)``: share of letter answers naming the first position
  (0.5 for a judge that answers by content on order-balanced questions, 1.0 for "always A");
* same-letter rate ``max(#A, #B) / (#A + #B)``; above :data:`SAME_LETTER_WARN` (0.9) on at least
  :data:`MIN_CALLS_WARN` letter answers the run warns (``warnings.warn``, a CLI line, and the
  ``warnings`` field of the stats): its verdicts are mostly position, not content;
* consistency rate (swap mode only): share of pairs, among those with two valid replies, whose
  two verdicts agree after mapping back;
* abstention rate: share of pairs whose final verdict is ``abstain``.

Caching: the swapped question is a different prompt (the texts change places), and the judge
cache keys on the full messages, so the two orders are cached separately.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from curate.selectors.critiq.judge import WorkerResult

SAME_LETTER_WARN = 0.9
# below this many letter answers a run of equal letters is weak evidence (10 fair coins agree
# with probability 2/1024), so no warning is raised
MIN_CALLS_WARN = 10
_FLIP = {"A": "B", "B": "A", None: None}
INVALID = WorkerResult(None, "invalid", "", "")


def flip_vote(vote: str | None) -> str | None:
    """The verdict on the swapped pair mapped back to the original order (A↔B, None stays)."""
    return _FLIP[vote]


def reconcile(first: WorkerResult, swapped: WorkerResult) -> WorkerResult:
    """The verdict that survives the swap (module docstring); ``swapped`` is the raw reply to
    the pair with its texts exchanged (not yet mapped back)."""
    if first.status == "invalid" or swapped.status == "invalid":
        bad = first if first.status == "invalid" else swapped
        return WorkerResult(None, "invalid", first.thought, bad.raw)
    back = flip_vote(swapped.vote) if swapped.status == "ok" else None
    mine = first.vote if first.status == "ok" else None
    if mine is not None and mine == back:
        return first
    if mine is None and back is None:
        return WorkerResult(None, "abstain", first.thought, first.raw)
    return WorkerResult(None, "abstain", f"inconsistent across orders: {mine or 'None'} then "
                        f"{swapped.vote or 'None'} on the swapped pair", first.raw)


@dataclass
class PositionStats:
    """Counts behind the position-bias report of one criterion (or of all of them)."""

    n_calls: int = 0
    n_a: int = 0
    n_b: int = 0
    n_none: int = 0
    n_invalid: int = 0
    n_pairs: int = 0
    n_both_valid: int = 0
    n_consistent: int = 0
    n_abstain: int = 0

    def add(self, other: PositionStats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def position_bias_rate(self) -> float | None:
        n = self.n_a + self.n_b
        return self.n_a / n if n else None

    @property
    def same_letter_rate(self) -> float | None:
        n = self.n_a + self.n_b
        return max(self.n_a, self.n_b) / n if n else None

    def as_dict(self, swap: bool) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["position_bias_rate"] = self.position_bias_rate
        out["same_letter_rate"] = self.same_letter_rate
        out["consistency_rate"] = (self.n_consistent / self.n_both_valid if swap and self.n_both_valid else None)
        out["abstention_rate"] = self.n_abstain / self.n_pairs if self.n_pairs else None
        return out

    @property
    def biased(self) -> bool:
        rate = self.same_letter_rate
        return rate is not None and self.n_a + self.n_b >= MIN_CALLS_WARN and rate > SAME_LETTER_WARN


def _count_calls(st: PositionStats, results: Sequence[WorkerResult]) -> None:
    for r in results:
        st.n_calls += 1
        if r.status == "invalid":
            st.n_invalid += 1
        elif r.status == "ok" and r.vote == "A":
            st.n_a += 1
        elif r.status == "ok" and r.vote == "B":
            st.n_b += 1
        else:
            st.n_none += 1


class PositionLog:
    """Accumulates :class:`PositionStats` per criterion over every pairwise judgment of a run.

    Args:
        swap: whether the run asks both orders (consistency is only defined then).
        judge: the judge's name, for the warning text.
    """

    def __init__(self, swap: bool, judge: str = "") -> None:
        self.swap = swap
        self.judge = judge
        self.per: dict[str, PositionStats] = {}
        self._warned = False

    def record(self, name: str, first: Sequence[WorkerResult], swapped: Sequence[WorkerResult] | None,
               final: Sequence[WorkerResult]) -> None:
        """Add one criterion's raw replies (``swapped`` None when not swapping) and final verdicts."""
        st = PositionStats()
        _count_calls(st, first)
        if swapped is not None:
            _count_calls(st, swapped)
            for a, b in zip(first, swapped, strict=True):
                if a.status != "invalid" and b.status != "invalid":
                    st.n_both_valid += 1
                    st.n_consistent += (a.vote if a.status == "ok" else None) == \
                        flip_vote(b.vote if b.status == "ok" else None)
        st.n_pairs += len(final)
        st.n_abstain += sum(r.status == "abstain" for r in final)
        self.per.setdefault(name, PositionStats()).add(st)

    def overall(self) -> PositionStats:
        tot = PositionStats()
        for st in self.per.values():
            tot.add(st)
        return tot

    def messages(self) -> list[str]:
        """One line per biased criterion and one for the whole run (empty when none is biased)."""
        who = f"judge '{self.judge}'" if self.judge else "the judge"
        out = []
        tot = self.overall()
        if tot.biased:
            letter = "A" if tot.n_a >= tot.n_b else "B"
            out.append(f"POSITION BIAS: {who} answered \"{letter}\" in {tot.same_letter_rate:.1%} of "
                       f"{tot.n_a + tot.n_b} letter answers; its verdicts reflect the order of the texts, not their "
                       + ("content (swap mode turns them into abstentions)." if self.swap
                          else "content. Ask in both orders (swap) to discard them."))
        for name in sorted(self.per):
            st = self.per[name]
            if st.biased:
                letter = "A" if st.n_a >= st.n_b else "B"
                out.append(f"POSITION BIAS: {who} answered \"{letter}\" in {st.same_letter_rate:.1%} of "
                           f"{st.n_a + st.n_b} letter answers for criterion '{name}'.")
        return out

    def warn(self) -> list[str]:
        """Issue the :meth:`messages` as ``warnings.warn`` (once per log) and return them."""
        msgs = self.messages()
        if msgs and not self._warned:
            self._warned = True
            for m in msgs:
                warnings.warn(m, UserWarning, stacklevel=2)
        return msgs

    def report(self) -> dict[str, Any]:
        """JSON-ready report: ``swap``, ``overall`` and ``per_criterion`` rates, and ``warnings``."""
        return {"swap": self.swap, "overall": self.overall().as_dict(self.swap),
                "per_criterion": {n: self.per[n].as_dict(self.swap) for n in sorted(self.per)},
                "warnings": self.messages()}


def ask_in_orders(ask: Callable[[str, int, bool], WorkerResult], names: Sequence[str], n: int, *, swap: bool,
                  max_workers: int = 4, log: PositionLog | None = None) -> dict[str, list[WorkerResult]]:
    """Every (name, item) asked once, or twice with ``swap`` (``ask(name, i, swapped)``), the two
    replies reconciled by :func:`reconcile`; results assembled by (name, index), never by
    completion order. Each name's raw replies and verdicts go to ``log``.

    Raises the first exception of a call after cancelling the calls not yet started (finished
    calls are already in the judge cache).
    """
    orders = (False, True) if swap else (False,)
    raw: dict[tuple[str, bool], list[WorkerResult]] = {(k, s): [INVALID] * n for k in names for s in orders}
    jobs = [(k, i, s) for k in names for i in range(n) for s in orders]
    with ThreadPoolExecutor(max_workers=max_workers) as ex:
        futs = {ex.submit(ask, *job): job for job in jobs}
        done, _ = wait(futs, return_when="FIRST_EXCEPTION")
        failed = [f for f in done if f.exception() is not None]
        if failed:
            for f in futs:
                f.cancel()
            raise failed[0].exception()  # type: ignore[misc]
        for f, (k, i, s) in futs.items():
            raw[k, s][i] = f.result()
    out: dict[str, list[WorkerResult]] = {}
    for k in names:
        first, second = raw[k, False], (raw[k, True] if swap else None)
        out[k] = [reconcile(a, b) for a, b in zip(first, second, strict=True)] if second is not None else list(first)
        if log is not None:
            log.record(k, first, second, out[k])
    return out
