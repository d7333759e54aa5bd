"""Budget arithmetic shared by every selector: token counts, group labels, quota plans and the fill.

A budget is spent in *units*: rows (``n`` / ``fraction`` budgets) or tokens (``tokens`` budgets).
:class:`~curate.selectors.base.BaseSelector` asks the selector for its pick order and then walks it
with :func:`fill`, which is the only place a budget is enforced, so every selector gets exact token
budgets and stratified quotas through the same code path.

Token budgets (first-fit in pick order). Walk the selector's order; a row whose units fit in what
is left is taken, a row that does not fit is skipped (reason ``over_token_budget``) and the walk
goes on, so the kept total ``S`` satisfies ``T - S < min(len(r))`` over the rows still unpicked:
the budget is filled to within one row. With ``overshoot`` the first row that crosses ``T`` is
taken and the walk stops (``S < T + len(last)``).

Stratified budgets. Rows carry a group label (the ``by`` column). ``ratios`` fix each group's
share: the quotas are the largest-remainder (Hamilton) apportionment of ``T`` units,
``q_g = floor(r_g T) + [g among the T - sum floor(r_g T) largest remainders]`` (ties by group
name), so they are integers that sum to ``T`` exactly and ``|q_g - r_g T| < 1``. ``min`` / ``max``
are floors and caps: ``lo_g = ceil(min_g T)``, ``hi_g = floor(max_g T)`` (a value above 1 is an
absolute number of units). The fill takes, for each group, its first rows in the selector's order
until its floor is met (phase 1), then walks the order again taking any row whose group is under
its cap and that fits the total (phase 2). Rows skipped because their group is full get the
reason ``over_quota: <group>``. Ratio quotas set floor = cap, so phase 2 adds nothing. Quotas over
several columns (``also:``) are met together greedily: the floors of min/max columns are served
first, then the ratio columns, each only with rows that break no cap of any column; a combination
the greedy cannot meet is reported as unmet (diagnostics and a warning), never silently.

When the selector's pick order runs out before a floor or the token budget is met, the base class
asks for a longer order (doubling ``k``); score-then-cut selectors give their whole order at once.

A quota the pool cannot meet (a group with fewer rows or tokens than its floor, or floors that sum
above the budget) is a :class:`QuotaError` raised before the selector runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import numpy as np
import polars as pl

from curate.curation.tokens import resolve_column
from curate.errors import RecipeError, SchemaError

ANY_GROUP = "*"
NULL_GROUP = "(none)"
OVER_TOKENS = "over_token_budget"
_EPS = 1e-9


class QuotaError(RecipeError):
    """Group quotas that the pool cannot meet; ``shortfalls`` maps group -> units missing."""

    def __init__(self, message: str, shortfalls: Mapping[str, float]) -> None:
        super().__init__(message)
        self.shortfalls = dict(shortfalls)


# --------------------------------------------------------------------------- columns and tokens
def token_column(table: pl.DataFrame) -> str | None:
    """The column holding counted tokens per row (``n_tokens`` or ``<step>__n_tokens``), or None."""
    try:
        return resolve_column(table, "n_tokens")
    except SchemaError:
        return None


def token_counts(table: pl.DataFrame) -> tuple[np.ndarray, str | None]:
    """(tokens per row, the column they came from or None).

    Counted tokens (the ``count_tokens`` step) when present; otherwise a whitespace word count of the
    prompt+response text, a tokenizer-free estimate (about 0.75 of a BPE token count on English),
    marked approximate by the None.
    """
    col = token_column(table)
    if col is not None:
        return table[col].cast(pl.Float64, strict=False).fill_null(0.0).to_numpy().astype(np.float64), col
    from curate.schema import texts

    return np.array([len(t.split()) for t in texts(table, "prompt+response")], dtype=np.float64), None


# --------------------------------------------------------------------------- group labels
def _aliases(value: str) -> list[str]:
    """Names a user may call a path-like group value by: the file name, its stem without any
    extension, and the parent folder (``../data/alpaca/alpaca_5000.json`` -> alpaca_5000.json,
    alpaca_5000, alpaca)."""
    if "/" not in value and "\\" not in value:
        return []
    p = PurePath(value.replace("\\", "/"))
    stem = p.name.split(".", 1)[0]
    return [a for a in (p.name, stem, p.parent.name) if a]


def group_labels(values: Sequence[Any], keys: Sequence[str]) -> np.ndarray:
    """The group label of each row: the quota key that names its value, else the value itself.

    A key names a value when it equals it, or, when no value equals the key, when it equals one of
    the value's path aliases (:func:`_aliases`), so ``by: source`` takes ``alpaca: 0.6`` for every
    file under ``.../alpaca/``. Nulls are the group ``(none)``.

    Raises:
        RecipeError: one value is named by two keys.
    """
    text = [NULL_GROUP if v is None else str(v) for v in values]
    distinct = sorted(set(text))
    keyset = [k for k in keys if k != ANY_GROUP]
    mapping: dict[str, str] = {}
    for key in keyset:
        exact = [v for v in distinct if v == key]
        hits = exact or [v for v in distinct if key in _aliases(v)]
        for v in hits:
            if v in mapping and mapping[v] != key:
                raise RecipeError(f"budget: the group value {v!r} is named by both '{mapping[v]}' and '{key}'.")
            mapping[v] = key
    return np.array([mapping.get(t, t) for t in text], dtype=object)


# --------------------------------------------------------------------------- plans
def largest_remainder(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Hamilton apportionment of ``total`` units by ``weights`` (summing to 1): floors first, then one
    unit to each of the largest remainders, ties to the smaller group name."""
    exact = {g: float(w) * total for g, w in weights.items()}
    out = {g: int(math.floor(x + _EPS)) for g, x in exact.items()}
    left = total - sum(out.values())
    for g in sorted(exact, key=lambda g: (-(exact[g] - out[g]), g))[: max(left, 0)]:
        out[g] += 1
    return out


@dataclass
class Plan:
    """Floors and caps per group, in units. ``None`` caps mean "no cap"; ``exact`` marks ratio
    quotas (floor = cap, filled first-fit without crossing)."""

    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)
    exact: bool = False


def _units_of(share: float, total: float, *, up: bool) -> float:
    """A share (<= 1) of ``total`` or an absolute number of units (> 1), rounded to whole units."""
    x = share * total if share <= 1.0 else share
    return float(math.ceil(x - _EPS) if up else math.floor(x + _EPS))


def make_plan(labels: np.ndarray, units: np.ndarray, total: float, *, ratios: Mapping[str, float] | None,
              mins: Mapping[str, float] | None, maxs: Mapping[str, float] | None, by: str, unit: str) -> Plan:
    """Floors and caps per group for a budget of ``total`` units, checked against the pool.

    Raises:
        QuotaError: a group's floor exceeds what the pool holds, or the floors exceed the budget;
            the message names every such group and its shortfall.
    """
    supply: dict[str, float] = {}
    for g, u in zip(labels.tolist(), units.tolist()):
        supply[g] = supply.get(g, 0.0) + float(u)
    plan = Plan()
    if ratios:
        quotas = largest_remainder(int(math.floor(total + _EPS)), ratios)
        for g in supply:
            quotas.setdefault(g, 0)
        plan.lo = {g: float(q) for g, q in quotas.items()}
        plan.hi = dict(plan.lo)
        plan.exact = True
    else:
        groups = sorted(set(supply) | {k for k in (mins or {}) if k != ANY_GROUP}
                        | {k for k in (maxs or {}) if k != ANY_GROUP})
        for g in groups:
            m = (mins or {}).get(g, (mins or {}).get(ANY_GROUP))
            if m is not None:
                plan.lo[g] = _units_of(m, total, up=True)
            c = (maxs or {}).get(g, (maxs or {}).get(ANY_GROUP))
            if c is not None:
                plan.hi[g] = _units_of(c, total, up=False)
        for g in groups:
            if g in plan.lo and g in plan.hi and plan.lo[g] > plan.hi[g]:
                raise QuotaError(f"budget by '{by}': group '{g}' has a floor of {plan.lo[g]:g} {unit} above its cap "
                                 f"of {plan.hi[g]:g}.", {g: plan.lo[g] - plan.hi[g]})
    short = {g: need - supply.get(g, 0.0) for g, need in sorted(plan.lo.items()) if need > supply.get(g, 0.0) + _EPS}
    if short:
        parts = [f"'{g}' needs {plan.lo[g]:g} {unit}, the pool has {supply.get(g, 0.0):g} (short by {s:g})"
                 for g, s in short.items()]
        raise QuotaError(f"budget by '{by}': quotas cannot be met: " + "; ".join(parts) + ".", short)
    floors = sum(plan.lo.values())
    if not plan.exact and floors > total + _EPS:
        raise QuotaError(f"budget by '{by}': the group minimums add up to {floors:g} {unit}, above the budget of "
                         f"{total:g}.", {ANY_GROUP: floors - total})
    return plan


# --------------------------------------------------------------------------- the fill
@dataclass
class Stratum:
    """One partition of the pool with its plan: ``labels`` (a group per row) and floors/caps."""

    by: str
    labels: np.ndarray
    plan: Plan


@dataclass
class Filled:
    """What :func:`fill` took: ``order`` (taken rows in the selector's pick order), ``cut`` (row -> reason for rows
    of the pick order it skipped), ``used`` (units per (stratum, group)), ``total`` (units spent)
    and ``unmet`` (whether a floor or the total could still use rows outside the pick order)."""

    order: np.ndarray
    cut: dict[int, str]
    used: dict[tuple[int, Any], float]
    total: float
    unmet: bool


def fill(order: np.ndarray, units: np.ndarray, total: float, *, tokens: bool, overshoot: bool = False,
         strata: Sequence[Stratum] = ()) -> Filled:
    """Spend a budget of ``total`` units along the pick ``order`` (see the module docstring).

    Several strata (e.g. ``source`` ratios and ``language`` floors) are met together greedily:
    phase 1 serves the floors of the min/max strata first (they are usually the small groups),
    then the ratio strata, each time only with rows that break no cap of any stratum; phase 2
    fills the rest under every cap. A combination the greedy cannot meet is reported as unmet.
    """
    n = len(units)
    taken = np.zeros(n, dtype=bool)
    picked: list[int] = []
    cut: dict[int, str] = {}
    used: dict[tuple[int, Any], float] = {}
    spent = 0.0
    order = np.asarray(order, dtype=np.int64)
    walk = order.tolist()

    def take(i: int) -> None:
        nonlocal spent
        taken[i] = True
        picked.append(i)
        for s, st in enumerate(strata):
            key = (s, st.labels[i])
            used[key] = used.get(key, 0.0) + float(units[i])
        spent += float(units[i])

    def capped(i: int, u: float, skip: int = -1) -> str:
        """The quota ``i`` would break (in any stratum but ``skip``), or ""."""
        for s, st in enumerate(strata):
            if s == skip:
                continue
            g = st.labels[i]
            if g in st.plan.hi and used.get((s, g), 0.0) + u > st.plan.hi[g] + _EPS:
                return f"over_quota: {g}"
        return ""

    for s in sorted(range(len(strata)), key=lambda s: strata[s].plan.exact):  # phase 1: floors
        st = strata[s]
        done: set[Any] = set()
        for i in walk:
            g = st.labels[i]
            need = st.plan.lo.get(g, 0.0)
            have = used.get((s, g), 0.0)
            if taken[i] or g in done or have >= need - _EPS:
                continue
            u = float(units[i])
            if capped(i, u, skip=s):
                continue  # it would break another stratum's cap
            crosses = have + u > need + _EPS
            own_cap = g in st.plan.hi and have + u > st.plan.hi[g] + _EPS
            if own_cap or spent + u > total + _EPS or (st.plan.exact and crosses):
                if not (tokens and overshoot and crosses and spent < total - _EPS):
                    continue  # quotas, caps and the total are filled first-fit, never crossed...
                done.add(g)  # ...unless asked: the crossing row is kept and the group is done
            take(i)
    stop = False
    for i in walk:  # phase 2: the rest of the budget, caps respected
        if taken[i]:
            continue
        u = float(units[i])
        if stop:
            cut[i] = OVER_TOKENS if tokens else ""
            continue
        why = capped(i, u)
        if why:
            cut[i] = why
            continue
        if spent + u > total + _EPS:
            if tokens and overshoot and spent < total - _EPS:
                take(i)
                stop = True
                continue
            cut[i] = OVER_TOKENS if tokens else ""
            continue
        take(i)
    # could rows outside the pick order still serve a floor or the total? (then a longer order helps)
    rest = np.ones(n, dtype=bool)
    rest[order] = False
    unmet = False
    if rest.any() and not stop:
        for s, st in enumerate(strata):
            for g, need in st.plan.lo.items():
                short = need - used.get((s, g), 0.0)
                if short > _EPS:
                    cand = units[rest & (st.labels == g)]
                    unmet = unmet or bool(cand.size and (not st.plan.exact or float(cand.min()) <= short + _EPS))
        if tokens or strata:
            unmet = unmet or float(units[rest].min()) <= total - spent + _EPS
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(len(order))
    kept = np.asarray(sorted(picked, key=lambda i: pos[i]), dtype=np.int64)  # ranks follow the selector's order
    return Filled(kept, cut, used, spent, unmet)


def composition(labels: np.ndarray, units: np.ndarray, kept: np.ndarray, plan: Plan | None) -> dict[str, Any]:
    """Per-group pool and kept units, kept share and quota (plain JSON for diagnostics)."""
    out: dict[str, Any] = {}
    total_kept = float(units[kept].sum())
    for g in sorted(set(labels.tolist())):
        m = labels == g
        row: dict[str, Any] = {"pool_rows": int(m.sum()), "pool_units": float(units[m].sum()),
                               "kept_rows": int((m & kept).sum()), "kept_units": float(units[m & kept].sum())}
        row["kept_share"] = row["kept_units"] / total_kept if total_kept else 0.0
        if plan is not None:
            row["floor"] = plan.lo.get(g)
            row["cap"] = plan.hi.get(g)
        out[str(g)] = row
    return out
