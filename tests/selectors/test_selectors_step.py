"""Selector pipeline steps: parameters, budgets, features mapping, output columns."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from curate.errors import MissingFeatureError, RecipeError
from curate.features.store import FeatureSet, FeatureStore
from curate.pipeline.registry import build_step, describe_steps
from curate.pipeline.step import StepContext, check_step_output
from curate.testing import toy_table, toy_targets


@pytest.fixture()
def ctx(tmp_path):
    table = toy_table(40, 0)
    targets = toy_targets(6, 1)
    rng = np.random.default_rng(0)
    store = FeatureStore(tmp_path / "features")
    store.put(FeatureSet("grad/adam", np.asarray(table["uid"].to_list(), dtype=object), rng.normal(size=(40, 5))))
    store.put(FeatureSet("tg", np.asarray(targets["uid"].to_list(), dtype=object), rng.normal(size=(6, 5))))
    return table, StepContext(seed=3, features=store, targets=targets, step_dir=tmp_path / "step")


def test_selectors_step_bids(ctx) -> None:
    table, c = ctx
    step = build_step("bids", {"budget": 0.25, "features": {"target_grads": "tg"}})
    out = check_step_output("bids", table, step.apply(table, c))
    assert out["keep"].sum() == 10
    assert {"uid", "keep", "reason", "score", "rank", "target", "task"} <= set(out.columns)
    assert out["uid"].to_list() == table["uid"].to_list()
    assert "thi" in c.stats["selection"]["diagnostics"]
    direct = step._selector.select(table, {"grads": c.features["grad/adam"], "target_grads": c.features["tg"]}, 10,
                                   seed=3, targets=c.targets)
    assert direct.frame.equals(out.select(direct.frame.columns))


@pytest.mark.parametrize("budget", [{"n": 7}, 7, "tokens:150"])
def test_selectors_step_budget_forms(ctx, budget) -> None:
    table, c = ctx
    out = build_step("random", {"budget": budget}).apply(table, c)
    if budget == "tokens:150":
        assert table.filter(pl.Series(out["keep"]))["n_tokens"].sum() <= 150
    else:
        assert out["keep"].sum() == 7


@pytest.mark.parametrize(
    ("params", "match"),
    [({"budget": 0}, "budget"), ({"budget": -0.5}, "budget"), ({"budget": {"rows": 3}}, "budget"),
     ({"alpha": 1}, "unknown parameter"), ({"normalize": "yes"}, "'normalize' parameter of BIDS"),
     ({"features": {"embed": "x"}}, "features"), ({"features": ["x"]}, "features")],
)
def test_selectors_step_bad_params(params, match) -> None:
    with pytest.raises(RecipeError, match=match):
        build_step("bids", params)


def test_selectors_step_missing_feature_and_dims(ctx, tmp_path) -> None:
    table, c = ctx
    with pytest.raises(MissingFeatureError, match="grad/sgd/targets"):
        build_step("less", {}).apply(table, c)
    c.features.put(FeatureSet("tg3", np.asarray(c.targets["uid"].to_list(), dtype=object), np.ones((6, 3))))
    from curate.errors import SchemaError

    with pytest.raises(SchemaError, match="do not match"):
        build_step("less", {"features": {"target_grads": "tg3"}}).apply(table, c)


def test_selectors_step_listed() -> None:
    steps = describe_steps()
    assert steps["tarot"]["params"]["mode"] == "fixed_size"
    assert steps["less"]["params"]["budget"] == 0.05
    assert "features" in steps["bids"]["params"]
