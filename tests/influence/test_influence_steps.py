"""The `influence_scores` recipe step: keeps every row, writes the `scores` feature set selectors read."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from curate.errors import MissingFeatureError, RecipeError
from curate.features.store import FeatureStore
from curate.features.tiny import tiny_llama, tiny_tokenizer
from curate.pipeline.registry import build_step
from curate.pipeline.step import StepContext, check_step_output
from curate.schema import make_record, to_frame

torch.set_num_threads(1)

POOL = [("What is 2+3?", "5"), ("Name a colour.", "Blue."), ("Capital of France?", "Paris."),
        ("Spell cat.", "c-a-t"), ("Add 1 and 1.", "2"), ("Opposite of up?", "down")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("infstep")
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok), dtype="float32", seed=2).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root


def _tables():
    pool = to_frame([make_record("sft", messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                     for q, a in POOL])
    tgt = to_frame([make_record("target", task=t, messages=[{"role": "user", "content": q}], answer=a)
                    for t, q, a in (("math", "What is 4+1?", "5"), ("geo", "Capital of Spain?", "Madrid."))])
    return pool, tgt


def test_influence_step_writes_scores_and_keeps_rows(folder, tmp_path):
    from curate.influence.api import fit_table, score_tables

    pool, tgt = _tables()
    params = {"model": str(folder / "lm"), "fisher": "empirical", "max_length": 48, "batch_size": 2,
              "strategy": "kfac"}
    step = build_step("influence_scores", params)
    ctx = StepContext(features=FeatureStore(tmp_path / "features"), targets=tgt, step_dir=tmp_path / "step")
    shuffled = pool.sample(fraction=1.0, shuffle=True, seed=1)
    out = check_step_output("influence_scores", shuffled, step.apply(shuffled, ctx))
    assert out["keep"].all() and out["uid"].to_list() == shuffled["uid"].to_list()

    fs = ctx.features["scores"]
    assert fs.meta["target_uids"] == tgt["uid"].to_list() and fs.values.shape == (pool.height, tgt.height)
    # the same numbers as the table API on the same rows (row order of the pool does not matter)
    ref = score_tables(pool, tgt, fit_table(pool, tmp_path / "ref", model=str(folder / "lm"), strategy="kfac",
                                            fisher="empirical", batch_size=2, max_length=48), batch_size=2)
    # (float32 model: scoring batches of the shuffled table pad differently, hence rtol 1e-4)
    np.testing.assert_allclose(fs.align(pool["uid"]), ref.values.T, rtol=1e-4, atol=1e-7 * np.abs(ref.values).max())
    np.testing.assert_allclose(out["score"].to_numpy(), fs.align(shuffled["uid"]).mean(1), rtol=1e-12)

    # cached: a second run does not refit (the factors folder is not recreated)
    import shutil

    shutil.rmtree(tmp_path / "step" / "factors")
    again = step.apply(shuffled, ctx)
    assert again["score"].to_list() == out["score"].to_list() and not (tmp_path / "step" / "factors").exists()

    # reusing a fitted folder gives the same scores
    reuse = build_step("influence_scores", {"factors": str(tmp_path / "ref"), "max_length": 48, "batch_size": 2,
                                            "feature": "scores_reuse"})
    reuse.apply(pool, ctx)
    np.testing.assert_allclose(ctx.features["scores_reuse"].values, fs.align(pool["uid"]), rtol=1e-6,
                               atol=1e-9 * np.abs(ref.values).max())


def test_influence_step_needs_targets_and_validates(folder, tmp_path):
    pool, _ = _tables()
    step = build_step("influence_scores", {"model": str(folder / "lm")})
    with pytest.raises(MissingFeatureError, match="targets"):
        step.apply(pool, StepContext(features=FeatureStore(tmp_path / "f"), targets=None))
    for bad in ({"strategy": "exact"}, {"query_rank": 0}, {"tfidf_top": -1}, {"damping": -1.0},
                {"normalize": "l2"}, {"max_length": 0}, {"fisher": "sampled"}):
        with pytest.raises(RecipeError, match=next(iter(bad))):
            build_step("influence_scores", bad)


def test_influence_step_scores_feed_a_selector(folder, tmp_path):
    """LESS with source='scores' reads the step's feature set and ranks by it."""
    from curate.selectors import get_selector
    from curate.selectors.base import Budget

    pool, tgt = _tables()
    ctx = StepContext(features=FeatureStore(tmp_path / "features"), targets=tgt, step_dir=tmp_path / "step")
    build_step("influence_scores", {"model": str(folder / "lm"), "fisher": "empirical", "max_length": 48,
                                    "strategy": "identity"}).apply(pool, ctx)
    sel = get_selector("less")(source="scores")
    res = sel.select(pool, {"scores": ctx.features["scores"]}, Budget(n=2), seed=0, targets=tgt)
    assert int(res.frame["keep"].sum()) == 2
    assert isinstance(res.frame, pl.DataFrame)
