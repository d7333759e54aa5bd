"""The selector contract: :class:`Selector`, :class:`Budget`, :class:`Selection`, :class:`BaseSelector`.

docs/architecture.md "Contracts". A selector is a frozen keyword-only dataclass whose fields are its
hyperparameters (validated in ``__post_init__`` with :func:`curate.errors.param_error`). It reads
feature sets by *role* (``"grads"``, ``"target_grads"``, ``"embed"``, ...) from a mapping
``role -> FeatureSet``; roles whose name starts with ``target_`` hold target rows, every other
role is aligned to the pool's uids.

:class:`BaseSelector` does the shared work so that a new selector writes only ``_score`` (and
``_choose`` when it is not score-then-cut):

- feature checks (missing roles raise :class:`~curate.errors.MissingFeatureError`; target feature
  dimensions must match the pool's);
- canonical order: the pool is sorted by ``uid`` before anything else, so results are invariant to
  row order and "first index" ties are "smallest uid" ties;
- budgets (``n``, ``fraction`` or ``tokens``, first-fit on counted tokens) and quotas per group of
  any column (:mod:`curate.selectors.quotas`), so every selector gets them through one code path;
- stable top-k with ties broken by uid;
- the :class:`Selection` frame (``uid, score, keep, rank, reason`` plus extra columns) in the
  caller's row order.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import polars as pl

from curate.errors import MissingFeatureError, SchemaError
from curate.io.store import FeatureSet
from curate.selectors.budget import Budget, Quota, row_tokens  # noqa: F401  (re-exported)
from curate.selectors.quotas import (
    OVER_TOKENS,
    QuotaError,  # noqa: F401  (re-exported)
    Stratum,
    composition,
    fill,
    group_labels,
    make_plan,
    resolve_column,
    token_column,
    token_counts,
)
from curate.validation import check_bool, check_choice, check_float, check_int, check_str  # noqa: F401  (re-exported)

KEPT = "kept"
BELOW_CUTOFF = "below_budget_cutoff"


# --------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """The result of a selector.

    Attributes:
        frame: one row per candidate, in the input table's order: ``uid`` (str), ``score`` (f64),
            ``keep`` (bool), ``rank`` (i64, 1-based pick order for kept rows, null otherwise),
            ``reason`` (str, never empty) and selector-specific extra columns.
        params: the selector's parameters, the budget and the seed.
        diagnostics: plain-JSON numbers (OT distances, estimated ratios, THI tables, ...).
    """

    frame: pl.DataFrame
    params: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_uids(self) -> list[str]:
        """Kept uids in pick (rank) order."""
        return self.frame.filter(pl.col("keep")).sort("rank")["uid"].to_list()

    @property
    def n_kept(self) -> int:
        return int(self.frame["keep"].sum())

    def _repr_html_(self) -> str:
        """Compact notebook summary: kept / pool, budget, seed, score range, top drop reasons."""
        from curate.io import notebook as nb
        from curate.pipeline.outcome import count_reasons

        kept = self.frame.filter(pl.col("keep"))
        scores = kept["score"].drop_nans().drop_nulls() if "score" in kept.columns else kept["uid"].head(0)
        score = (f"kept scores {float(scores.min()):.4g} … {float(scores.median()):.4g} … {float(scores.max()):.4g}"
                 if scores.len() else "")
        dropped = count_reasons(self.frame.filter(~pl.col("keep"))["reason"].to_list())
        p = self.params
        others = {k: v for k, v in p.items() if k not in ("selector", "budget", "seed")}
        return nb.box(f"Selection · {p.get('selector', '')}", [
            f"kept <b>{self.n_kept}</b> of {self.frame.height}; budget {nb.esc(p.get('budget'))}; "
            f"seed {nb.esc(p.get('seed'))}",
            nb.esc(score),
            "dropped: " + nb.reasons(dropped) if dropped else "",
            "params: " + nb.esc(", ".join(f"{k}={v!r}" for k, v in list(others.items())[:8])) if others else "",
        ])


@runtime_checkable
class Selector(Protocol):
    """What every selector is (docs/architecture.md "Contracts")."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]]

    def select(
        self, table: pl.DataFrame, features: Mapping[str, FeatureSet], budget: Budget, *, seed: int = 0,
        targets: pl.DataFrame | None = None,
    ) -> Selection: ...


# --------------------------------------------------------------------------- context / choice
@dataclass
class SelectContext:
    """What ``_score`` / ``_choose`` see. Everything is in canonical (uid-sorted) order.

    Attributes:
        table: the pool sorted by uid.
        uids: ``table["uid"]`` as a numpy object array.
        features: pool roles as (N, d) float arrays aligned to ``uids``; target roles as
            :class:`FeatureSet` with uids sorted.
        targets: the target table sorted by uid (task labels), or None.
        seed: the seed; ``rng`` is ``np.random.default_rng(seed)``.
        budget: the budget; ``lengths`` are the row token counts when the budget is in tokens.
    """

    table: pl.DataFrame
    uids: np.ndarray
    features: dict[str, Any]
    targets: pl.DataFrame | None
    seed: int
    rng: np.random.Generator
    budget: Budget
    lengths: np.ndarray | None = None
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.uids)

    def target_tasks(self, target_uids: Sequence[str]) -> np.ndarray:
        """Task label of each target uid (from ``targets``; ``"all"`` when unknown)."""
        if self.targets is None or "task" not in self.targets.columns:
            return np.array(["all"] * len(target_uids), dtype=object)
        lut = dict(zip(self.targets["uid"].to_list(), self.targets["task"].to_list(), strict=False))
        return np.array([lut.get(u) or "all" for u in target_uids], dtype=object)


@dataclass
class Choice:
    """What ``_choose`` returns (canonical order).

    Attributes:
        order: indices of kept rows in pick order (length <= k).
        score: (N,) finite float scores (``-inf`` is allowed for unscored rows).
        reasons: optional (N,) reasons; empty entries are filled with kept/below_budget_cutoff.
        extra: extra per-row columns (name -> (N,) array or list).
        diagnostics: plain numbers for the Selection.
    """

    order: np.ndarray
    score: np.ndarray
    reasons: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)


def stable_topk(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, ties to the smaller index (= smaller uid in
    canonical order). NaN counts as -inf."""
    s = np.where(np.isnan(score), -np.inf, score)
    order = np.argsort(-s, kind="stable")
    return order[:k]


# --------------------------------------------------------------------------- base class
class BaseSelector:
    """Shared machinery; subclasses are frozen keyword-only dataclasses.

    Subclasses set ``name``, ``requires`` (feature roles), optionally ``needs_targets`` (a target
    table is mandatory) and ``default_features`` (role -> feature-store name used by the pipeline
    step), and implement ``_score(ctx) -> scores`` or ``(scores, extra)`` or ``_choose(ctx, k)``.
    """

    name: ClassVar[str] = "base"
    requires: ClassVar[tuple[str, ...]] = ()
    needs_targets: ClassVar[bool] = False
    default_features: ClassVar[dict[str, str]] = {}
    default_budget: ClassVar[Any] = 0.1
    #: (parameter, bad value) pairs that check_selector verifies are rejected (besides type errors).
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = ()
    #: constructor arguments the contract checks (curate.testing) use; a classmethod
    #: ``contract_params(folder, table) -> dict`` instead when they need files.
    contract_params: ClassVar[dict[str, Any]] = {}

    # ---- overridable -----------------------------------------------------------------
    def fills_budget(self) -> bool:
        """Whether the selector always keeps min(budget, N) rows (False for filters such as DEITA,
        whose diversity rule may reject rows, and for budgets that are caps, e.g. TAROT OTM)."""
        return True

    def required_features(self) -> tuple[str, ...]:
        """Roles this instance needs (may depend on parameters); defaults to ``requires``."""
        return tuple(self.requires)

    def _score(self, ctx: SelectContext) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} must implement _score or _choose")

    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        out = self._score(ctx)
        score, extra = (out if isinstance(out, tuple) else (out, {}))
        score = np.asarray(score, dtype=np.float64)
        return Choice(order=stable_topk(score, k), score=score, extra=extra)

    # ---- the shared path -----------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def select(
        self,
        table: pl.DataFrame,
        features: Mapping[str, FeatureSet] | None,
        budget: Budget | Any,
        *,
        seed: int = 0,
        targets: pl.DataFrame | None = None,
    ) -> Selection:
        """Select from ``table`` (one row per candidate, unique ``uid``) within ``budget``.

        Args:
            table: the pool; needs a ``uid`` column (plus whatever columns the selector reads).
            features: role -> :class:`FeatureSet`; pool roles must cover every pool uid.
            budget: a :class:`Budget` or anything :meth:`Budget.parse` accepts.
            seed: seed of every random choice.
            targets: the target table (``uid``, ``task``, texts) when the method uses one.

        Raises:
            MissingFeatureError: a required role is absent or lacks some uids.
            SchemaError: no/duplicated uids, non-finite features, mismatched target dimensions.
        """
        budget = Budget.parse(budget)
        features = dict(features or {})
        if "uid" not in table.columns:
            raise SchemaError(f"{self.name}: the pool has no uid column.", field="uid", expected="a uid column")
        if table["uid"].is_duplicated().any():
            dup = table.filter(pl.col("uid").is_duplicated())["uid"][0]
            raise SchemaError(f"{self.name}: the pool has duplicated uids.", field="uid", found=dup)
        if self.needs_targets and (targets is None or targets.height == 0):
            raise MissingFeatureError(f"selector '{self.name}' needs a target table (recipe 'targets' / --target).")
        roles = self.required_features()
        missing = [r for r in roles if r not in features]
        if missing:
            raise MissingFeatureError(
                f"selector '{self.name}' needs feature role(s) {missing}; given: {sorted(features)}."
            )
        canon = table.with_row_index("__row").sort("uid")
        uids = np.asarray(canon["uid"].to_list(), dtype=object)
        feats: dict[str, Any] = {}
        metas: dict[str, dict[str, Any]] = {}
        pool_dim = None
        for role in roles:
            fs = features[role]
            if role.startswith("target_"):
                order = np.argsort(np.asarray(fs.uids.tolist(), dtype=str), kind="stable")
                vals = np.asarray(fs.values)[order]
                vals = vals.reshape(len(vals), -1) if vals.ndim != 3 else vals
                feats[role] = FeatureSet(fs.name, fs.uids[order], vals, dict(fs.meta))
                _check_finite(self.name, role, fs.uids[order], vals)
            else:
                vals = fs.align(uids.tolist())
                vals = vals.reshape(len(vals), -1) if vals.ndim != 3 else vals
                _check_finite(self.name, role, uids, vals)
                feats[role] = vals
                metas[role] = dict(fs.meta)
                pool_dim = vals.shape[1:] if pool_dim is None else pool_dim
        for role in roles:
            if role.startswith("target_"):
                base = role[len("target_"):]
                if base in feats and feats[role].values.shape[1:] != feats[base].shape[1:]:
                    raise SchemaError(
                        f"selector '{self.name}': target features '{features[role].name}' do not match the pool's "
                        f"'{features[base].name}'.", field=role,
                        expected=f"shape (M, {', '.join(map(str, feats[base].shape[1:]))})",
                        found=f"(M, {', '.join(map(str, feats[role].values.shape[1:]))})",
                    )
        tsorted = targets.sort("uid") if targets is not None and "uid" in targets.columns else targets
        n = len(uids)
        counted, token_col = token_counts(canon) if (budget.tokens is not None or token_column(canon)) else (None, None)
        lengths = counted if budget.tokens is not None else None
        units = lengths if lengths is not None else np.ones(n)
        total = float(budget.tokens) if budget.tokens is not None else float(budget.rows(n))
        strata = []
        for q in budget.quotas():
            col = resolve_column(canon, q.by, owner=f"selector '{self.name}' budget")
            keys = [k for pairs in (q.ratios, q.min_share, q.max_share) if pairs for k, _ in pairs]
            labels = group_labels(canon[col].to_list(), keys)
            plan = make_plan(labels, units, total, ratios=dict(q.ratios or ()), mins=dict(q.min_share or ()),
                             maxs=dict(q.max_share or ()), by=col, unit="tokens" if lengths is not None else "rows")
            strata.append(Stratum(col, labels, plan))
        ctx = SelectContext(canon, uids, feats, tsorted, int(seed), np.random.default_rng(int(seed)), budget, lengths, metas)
        if budget.n is not None and budget.n > n:
            warnings.warn(
                f"{self.name}: budget of {budget.n} rows exceeds the pool of {n}; keeping every row.", stacklevel=2
            )
        k = budget.rows(n, lengths)
        if (strata or lengths is not None) and type(self)._choose is BaseSelector._choose:
            k = n  # score-then-cut: the whole order costs one sort and spares rescoring when a quota needs more
        choice = self._choose(ctx, k) if n else Choice(np.zeros(0, np.int64), np.zeros(0))
        order = np.asarray(choice.order, dtype=np.int64)
        if lengths is None and not strata:
            return self._frame(ctx, canon, choice, order, budget, {}, tokens=(counted, token_col))
        filled = fill(order, units, total, tokens=lengths is not None, overshoot=budget.overshoot, strata=strata)
        grow = max(k, 1)
        while filled.unmet and len(order) < n and grow < n:
            # the pick order ran out before a quota or the token budget was met: ask for a longer one
            # (doubling, so a greedy selector pays O(log) calls; some change their picks with k)
            grow = min(2 * grow, n)
            longer = self._choose(ctx, grow)
            refill = fill(np.asarray(longer.order, dtype=np.int64), units, total, tokens=lengths is not None,
                          overshoot=budget.overshoot, strata=strata)
            if refill.total >= filled.total or not refill.unmet:
                choice, order, filled = longer, np.asarray(longer.order, dtype=np.int64), refill
        if strata:
            kept = np.zeros(n, dtype=bool)
            kept[filled.order] = True
            report = []
            for s, st in enumerate(strata):
                # a floor is met when what is missing is less than the group's shortest row (first-fit tokens)
                unmet = {}
                for g, need in sorted(st.plan.lo.items()):
                    short = need - filled.used.get((s, g), 0.0)
                    rows = st.labels == g
                    slack = float(units[rows].min()) if lengths is not None and rows.any() else 1.0
                    if short >= slack - 1e-9:
                        unmet[g] = short
                report.append({"by": st.by, "unit": "tokens" if lengths is not None else "rows",
                               "composition": composition(st.labels, units, kept, st.plan), "unmet": unmet})
                if unmet:
                    warnings.warn(f"{self.name}: quotas by '{st.by}' left unmet (units short: {unmet}); the selector "
                                  "rejected rows they needed or the quotas of several columns conflict.", stacklevel=2)
            choice.diagnostics = {**choice.diagnostics, "groups": report[0], "strata": report}
            for q, st in zip(budget.quotas(), strata):  # each row's group, for reports and audits
                choice.extra[group_column(q.by)] = st.labels.tolist()
        return self._frame(ctx, canon, choice, filled.order, budget, filled.cut, tokens=(counted, token_col))

    def _frame(self, ctx: SelectContext, canon: pl.DataFrame, choice: Choice, order: np.ndarray,
               budget: Budget, cut: Mapping[int, str],
               tokens: tuple[np.ndarray | None, str | None] = (None, None)) -> Selection:
        n = ctx.n
        keep = np.zeros(n, dtype=bool)
        keep[order] = True
        rank = np.full(n, -1, dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        score = np.asarray(choice.score, dtype=np.float64)
        if score.shape != (n,):
            raise RuntimeError(f"{self.name}: _choose returned {score.shape} scores for {n} rows")
        reasons = np.array(
            [str(r) if r else "" for r in (choice.reasons if choice.reasons is not None else [""] * n)], dtype=object
        )
        reasons[keep & (reasons == "")] = KEPT
        reasons[~keep & (reasons == "")] = BELOW_CUTOFF
        for i, why in cut.items():  # rows of the pick order the budget skipped: say which limit cut them
            reasons[i] = why or BELOW_CUTOFF
        # a reason saying 'kept...' on a row cut by the budget would lie
        cut_rows = ~keep & np.array([str(r).startswith("kept") for r in reasons], dtype=bool)
        reasons[cut_rows] = OVER_TOKENS if budget.tokens is not None else BELOW_CUTOFF
        cols: dict[str, Any] = {
            "uid": ctx.uids.tolist(),
            "score": score,
            "keep": keep,
            "rank": pl.Series("rank", rank, dtype=pl.Int64),
            "reason": reasons.tolist(),
        }
        for key, vals in choice.extra.items():
            cols[key] = list(vals) if not isinstance(vals, np.ndarray) or vals.dtype == object else vals
        frame = pl.DataFrame(cols).with_columns(
            pl.when(pl.col("rank") > 0).then(pl.col("rank")).otherwise(None).alias("rank"),
            pl.Series("__row", canon["__row"]),
        ).sort("__row").drop("__row")
        params = {**_plain(self.params()), "budget": budget.describe(), "seed": ctx.seed, "selector": self.name}
        diag = {"n_pool": n, "n_kept": int(keep.sum()), **_plain(choice.diagnostics)}
        counted, col = tokens
        if counted is not None:
            diag["tokens"] = {"curated": float(counted[keep].sum()), "counted_by": col or "whitespace words",
                              "approximate": col is None}
        return Selection(frame, params, diag)


def group_column(by: str) -> str:
    """The Selection column holding each row's group under the quota ``by`` (``group_<by>``)."""
    return "group_" + by.replace("__", "_")


def _check_finite(owner: str, role: str, uids: np.ndarray, vals: np.ndarray) -> None:
    if not np.issubdtype(vals.dtype, np.number):
        raise SchemaError(f"selector '{owner}': feature role '{role}' is not numeric.", field=role, found=str(vals.dtype))
    flat = vals.reshape(len(vals), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise SchemaError(
            f"selector '{owner}': feature role '{role}' has non-finite values.", field=role,
            expected="finite values", found=f"uid {uids[i]}",
        )


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
