"""The selector contract (curate.testing): every named check over every registered selector, and
deliberately broken toy selectors that each named check catches."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl
import pytest

import curate.selectors as sel_pkg
from curate.errors import ParameterError
from curate.io.store import FeatureSet
from curate.selectors import SELECTORS, Budget
from curate.selectors.base import BaseSelector, Choice, SelectContext, check_float, stable_topk
from curate.testing import SELECTOR_CHECKS, check_selector, resolve_contract_params, selector_checks

CONTRACT = [(name, check) for name in sorted(SELECTORS) for check, _ in selector_checks(SELECTORS[name])]


@pytest.mark.parametrize(("name", "check"), CONTRACT)
def test_selector_contract(name: str, check: str, tmp_path) -> None:
    cls = SELECTORS[name]
    params = resolve_contract_params(cls, tmp_path)
    try:
        cls(**params)
    except ParameterError as exc:  # e.g. a plugin selector registered without contract_params
        pytest.xfail(f"{name} has required parameters and no contract_params: {exc}")
    dict(selector_checks(cls, params))[check]()


@pytest.mark.parametrize("mode", ["otm", "fixed_size"])
def test_selectors_contract_tarot_whitened(mode: str) -> None:
    check_selector(SELECTORS["tarot"], {"mode": mode})


# ------------------------------------------------------------------------ the checks can fail
@dataclass(frozen=True, kw_only=True)
class _Toy(BaseSelector):
    """A correct selector: top-k by the first embedding coordinate times ``weight``."""

    name: ClassVar[str] = "toy"
    requires: ClassVar[tuple[str, ...]] = ("embed",)
    weight: float = 1.0

    def __post_init__(self) -> None:
        check_float("Toy", "weight", self.weight, lo=0.0, lo_open=True)

    def _score(self, ctx: SelectContext) -> np.ndarray:
        return self.weight * np.asarray(ctx.features["embed"])[:, 0]


@dataclass(frozen=True, kw_only=True)
class _NoValidation(_Toy):
    def __post_init__(self) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class _FillsMissingFeatures(_Toy):
    """Zeros instead of a MissingFeatureError when 'embed' is absent or lacks uids."""

    def select(self, table: pl.DataFrame, features: Any, budget: Any, **kw: Any) -> Any:
        fs = dict(features or {}).get("embed")
        if fs is None or len(fs.uids) < table.height:
            uids = np.asarray(table["uid"].to_list(), dtype=object)
            features = {**dict(features or {}), "embed": FeatureSet("embed", uids, np.zeros((len(uids), 2)))}
        return super().select(table, features, budget, **kw)


def _edit_frame(name: str, edit: Any) -> type:
    """A _Toy subclass called ``name`` whose Selection.frame goes through ``edit``."""

    def select(self: Any, table: pl.DataFrame, features: Any, budget: Any, **kw: Any) -> Any:
        res = _Toy.select(self, table, features, budget, **kw)
        res.frame = edit(res.frame)
        return res

    return dataclass(frozen=True, kw_only=True)(type(name, (_Toy,), {"select": select, "__qualname__": name}))


_F32Score = _edit_frame("_F32Score", lambda f: f.with_columns(pl.col("score").cast(pl.Float32)))
_DuplicateUid = _edit_frame("_DuplicateUid", lambda f: f.with_columns(
    pl.when(pl.int_range(pl.len()) == 1).then(pl.col("uid").first()).otherwise(pl.col("uid")).alias("uid")))
_AllRankOne = _edit_frame("_AllRankOne", lambda f: f.with_columns(
    pl.when(pl.col("keep")).then(pl.lit(1, dtype=pl.Int64)).otherwise(None).alias("rank")))
_EmptyReason = _edit_frame("_EmptyReason", lambda f: f.with_columns(pl.lit("").alias("reason")))


@dataclass(frozen=True, kw_only=True)
class _OverBudget(_Toy):
    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        score = self._score(ctx)
        return Choice(order=stable_topk(score, k + 1), score=score)


@dataclass(frozen=True, kw_only=True)
class _UnderFills(_Toy):
    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        score = self._score(ctx)
        return Choice(order=stable_topk(score, max(k - 1, 0)), score=score)


@dataclass(frozen=True, kw_only=True)
class _NaNScores(_Toy):
    def _score(self, ctx: SelectContext) -> np.ndarray:
        score = super()._score(ctx).copy()
        score[np.argsort(score)[:5]] = np.nan  # the five lowest: never kept, but NaN
        return score


@dataclass(frozen=True, kw_only=True)
class _Unseeded(_Toy):
    def _score(self, ctx: SelectContext) -> np.ndarray:
        return np.random.default_rng().normal(size=ctx.n)


@dataclass(frozen=True, kw_only=True)
class _FirstRowsFirst(_Toy):
    """Prefers the rows that come first in the caller's table (BaseSelector's row index column)."""

    def _score(self, ctx: SelectContext) -> np.ndarray:
        return -ctx.table["__row"].cast(pl.Float64).to_numpy()


@dataclass(frozen=True, kw_only=True)
class _Silent(_Toy):
    def select(self, table: pl.DataFrame, features: Any, budget: Any, **kw: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return super().select(table, features, budget, **kw)


BROKEN = [
    (_NoValidation, "check_parameter_validation", "accepted the invalid value <garbage>"),
    (_FillsMissingFeatures, "check_missing_features", "missing feature role 'embed' did not raise"),
    (_FillsMissingFeatures, "check_missing_feature_uids", "a uid missing from 'embed' did not raise"),
    (_F32Score, "check_frame_schema", "'score' is Float32, expected Float64"),
    (_DuplicateUid, "check_every_row_once", "not every candidate exactly once"),
    (_OverBudget, "check_budget_respected", "kept 8 rows over a budget of 7"),
    (_UnderFills, "check_budget_filled", "kept 6 rows for a budget of 7"),
    (_AllRankOne, "check_ranks", "kept ranks are not 1..7"),
    (_NaNScores, "check_finite_scores", "NaN scores"),
    (_EmptyReason, "check_reasons", "empty reasons"),
    (_Unseeded, "check_seed_deterministic", "the same seed gave different results"),
    (_FirstRowsFirst, "check_row_order_invariant", "not row-order invariant"),
    (_Silent, "check_budget_above_pool", "no warning for budget > pool"),
]


def test_selector_contract_toy_passes() -> None:
    check_selector(_Toy)
    assert [c.__name__ for c in SELECTOR_CHECKS] == [name for name, _ in selector_checks(_Toy)]
    assert {check for _, check, _ in BROKEN} == {c.__name__ for c in SELECTOR_CHECKS}  # each check shown to fail


@pytest.mark.parametrize(("toy", "check", "message"), BROKEN, ids=[f"{t.__name__}-{c}" for t, c, _ in BROKEN])
def test_selector_contract_check_fails(toy: type, check: str, message: str) -> None:
    with pytest.raises(AssertionError, match=f"^{toy.__name__}: .*{message}"):
        dict(selector_checks(toy))[check]()
    with pytest.raises(AssertionError, match="^check_"):
        check_selector(toy)


# ------------------------------------------------------------------------ registry and budgets
def test_selectors_registry_has_steps() -> None:
    from curate.pipeline.registry import STEPS

    for name in SELECTORS:
        assert name in STEPS
    assert set(sel_pkg.__all__) >= {"SELECTORS", "Budget", "Selection", "BaseSelector"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(500, Budget(n=500)), (0.1, Budget(fraction=0.1)), ("tokens:2e6", Budget(tokens=2e6)),
     ({"n": 3}, Budget(n=3)), ("0.5", Budget(fraction=0.5)), ("500", Budget(n=500)), (1.0, Budget(fraction=1.0))],
)
def test_selectors_budget_parse(value: object, expected: Budget) -> None:
    assert Budget.parse(value) == expected


@pytest.mark.parametrize("value", [0, -1, 0.0, -0.5, 1.5, "tokens:-1", {"n": 1, "fraction": 0.1}, {"bogus": 1}, True, "x"])
def test_selectors_budget_rejects(value: object) -> None:
    with pytest.raises(ParameterError, match="The .budget. parameter of Budget must be"):
        Budget.parse(value)


def test_selectors_budget_exactly_one() -> None:
    with pytest.raises(ParameterError):
        Budget(n=3, fraction=0.5)
    with pytest.raises(ParameterError):
        Budget()
    assert Budget(fraction=0.29).rows(100) == 29  # floor, robust to 0.29*100 = 28.999...
    assert Budget(tokens=10).rows(5, np.array([4.0, 3, 9, 2, 8])) == 3
