"""The ``whiten`` recipe step (TAROT, docs/methods/gradient-features.md §9) over feature sets in a store."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from curate.errors import MissingFeatureError, ParameterError, SchemaError
from curate.features.checkpoints import stack_checkpoints
from curate.features.store import FeatureSet, FeatureStore
from curate.features.whiten import WhitenStep, mahalanobis_cosine
from curate.pipeline.step import StepContext, check_step_output


def _ctx(tmp_path, pool, target, pool_meta=None, target_meta=None):
    store = FeatureStore(tmp_path / "features")
    store.put(FeatureSet("grad/sgd", np.asarray([f"p{i}" for i in range(len(pool))], dtype=object), pool,
                         pool_meta or {"cache_key": "a"}))
    store.put(FeatureSet("grad/sgd/targets", np.asarray([f"t{i}" for i in range(len(target))], dtype=object), target,
                         target_meta or {"cache_key": "b"}))
    return StepContext(seed=0, features=store)


def test_step_matches_mahalanobis_on_a_subset_and_keeps_zero_rows_out(tmp_path):
    rng = np.random.default_rng(1)
    pool, target = rng.normal(size=(30, 4)), rng.normal(size=(8, 4)) + 0.5
    pool[3] = 0.0  # a zero_gradient row: left out of the fit, stays zero
    ctx = _ctx(tmp_path, pool, target)
    alive = [f"p{i}" for i in range(0, 30, 2)][::-1]  # a subset, in another order
    table = pl.DataFrame({"uid": alive})
    out = check_step_output("whiten", table, WhitenStep().apply(table, ctx))
    assert out["keep"].all() and out["uid"].to_list() == alive
    zd = ctx.features["grad/whitened"]
    zq = ctx.features["grad/whitened/targets"]
    assert list(zd.uids) == alive
    rows = np.array([int(u[1:]) for u in alive])
    live = rows != 3
    assert out["whiten_zero"].to_list() == (~live).tolist()
    np.testing.assert_array_equal(np.asarray(zd.values)[~live], 0)
    want = mahalanobis_cosine(pool[rows[live]], target, ridge=1e-3)
    np.testing.assert_allclose(np.asarray(zd.values, dtype=np.float64)[live] @ np.asarray(zq.values, np.float64).T,
                               want, atol=1e-5)
    before = np.asarray(zd.values).copy()
    WhitenStep().apply(table, ctx)  # cached: same key, nothing recomputed
    np.testing.assert_array_equal(np.asarray(ctx.features["grad/whitened"].values), before)


def test_checkpoint_stacks_use_lr_weights(tmp_path):
    rng = np.random.default_rng(2)
    pool, target = rng.normal(size=(25, 2, 3)), rng.normal(size=(6, 2, 3))
    meta = {"lr_weights": [0.75, 0.25], "layout_hash": "h", "projector_id": "p"}
    ctx = _ctx(tmp_path, pool, target, {**meta, "cache_key": "a"}, {**meta, "cache_key": "b"})
    table = pl.DataFrame({"uid": [f"p{i}" for i in range(25)]})
    WhitenStep(ridge=0.0).apply(table, ctx)
    phi = stack_checkpoints([pool[:, 0], pool[:, 1]], [0.75, 0.25])
    psi = stack_checkpoints([target[:, 0], target[:, 1]], [0.75, 0.25])
    S = np.asarray(ctx.features["grad/whitened"].values, np.float64) @ np.asarray(
        ctx.features["grad/whitened/targets"].values, np.float64).T
    np.testing.assert_allclose(S, mahalanobis_cosine(phi, psi, ridge=0.0), atol=1e-5)


def test_guards(tmp_path):
    rng = np.random.default_rng(3)
    ctx = _ctx(tmp_path, rng.normal(size=(10, 3)), rng.normal(size=(4, 3)), {"layout_hash": "x"}, {"layout_hash": "y"})
    table = pl.DataFrame({"uid": [f"p{i}" for i in range(10)]})
    with pytest.raises(SchemaError, match="layout hash"):
        WhitenStep().apply(table, ctx)
    with pytest.raises(MissingFeatureError, match="lacks 1 of 11"):
        WhitenStep().apply(pl.DataFrame({"uid": [f"p{i}" for i in range(11)]}), ctx)
    with pytest.raises(MissingFeatureError, match="grad/adam"):
        WhitenStep(pool="grad/adam").apply(table, ctx)
    with pytest.raises(ParameterError, match="'ridge' parameter of whiten"):
        WhitenStep(ridge=-1)
    with pytest.raises(ParameterError, match="'ridge_mode' parameter of whiten"):
        WhitenStep(ridge_mode="huge")
