"""Recipes: validation errors list the valid keys, overrides, the step registry, builtin steps."""

from __future__ import annotations

import polars as pl
import pytest

from curate.errors import RecipeError
from curate.pipeline.recipe import apply_overrides, parse_recipe
from curate.pipeline.registry import build_step
from curate.pipeline.step import StepContext
from curate.schema import make_record, to_frame


def _raw(**extra):
    raw = {"name": "t", "inputs": ["x.json"], "steps": [{"use": "sample", "n": 2}]}
    raw.update(extra)
    return raw


def test_unknown_top_key_lists_valid_keys():
    with pytest.raises(RecipeError, match="unknown key.*'stepz'.*Valid keys: name, seed"):
        parse_recipe(_raw(stepz=[]))


def test_unknown_step_and_unknown_parameter():
    with pytest.raises(RecipeError, match="unknown step 'nope'"):
        parse_recipe(_raw(steps=[{"use": "nope"}]))
    with pytest.raises(RecipeError, match=r"unknown parameter\(s\) \['m'\].*Valid parameters: \['fraction', 'n'\]"):
        parse_recipe(_raw(steps=[{"use": "sample", "m": 3}]))


def test_bad_parameter_value_fails_at_load_time_with_template():
    with pytest.raises(RecipeError, match="The 'fraction' parameter of Sample must be in \\(0, 1\\]. Got 2"):
        parse_recipe(_raw(steps=[{"use": "sample", "fraction": 2}]))


def test_duplicate_step_names_refused():
    with pytest.raises(RecipeError, match="used twice"):
        parse_recipe(_raw(steps=[{"use": "sample", "n": 1}, {"use": "sample", "n": 2}]))


def test_overrides_by_step_name_and_top_level():
    raw = apply_overrides(_raw(), ["steps.sample.n=5", "seed=3"])
    rec = parse_recipe(raw)
    assert rec.seed == 3 and rec.steps[0].step.n == 5
    with pytest.raises(RecipeError, match="no step named 'other'"):
        apply_overrides(_raw(), ["steps.other.n=1"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        apply_overrides(_raw(), ["seed"])


def test_recipe_hash_changes_with_parameters_not_with_output(tmp_path):
    a = parse_recipe(_raw(), base=tmp_path)
    b = parse_recipe(_raw(output="elsewhere"), base=tmp_path)
    c = parse_recipe(apply_overrides(_raw(), ["steps.sample.n=3"]), base=tmp_path)
    assert a.hash() == b.hash() != c.hash()


def _pool(n: int) -> pl.DataFrame:
    return to_frame([make_record("sft", messages=[{"role": "user", "content": f"q{i}"},
                                                   {"role": "assistant", "content": f"a{i}"}]) for i in range(n)])


def test_sample_is_seeded_row_order_invariant_and_exact_size():
    t = _pool(50)
    step = build_step("sample", {"n": 10})
    out = step.apply(t, StepContext(seed=1))
    shuffled = step.apply(t.sample(fraction=1.0, shuffle=True, seed=9), StepContext(seed=1))
    kept = set(out.filter("keep")["uid"])
    assert len(kept) == 10 and kept == set(shuffled.filter("keep")["uid"])
    other = set(step.apply(t, StepContext(seed=2)).filter("keep")["uid"])
    assert other != kept
    assert all(r for r in out.filter(~pl.col("keep"))["reason"])


def test_kind_filter():
    t = pl.concat([_pool(3), to_frame([make_record("target", task="x", messages=[{"role": "user", "content": "q"}])])])
    out = build_step("kind_filter", {"kinds": ["sft"]}).apply(t, StepContext())
    assert out["keep"].to_list() == [True, True, True, False]
    assert "target" in out["reason"][3]


def test_recipe_built_in_python_keeps_step_paths_as_written(tmp_path):
    """Only a recipe read from a file (``base`` given) resolves step paths against its folder."""
    raw = _raw(steps=[{"use": "export", "path": "out/x.jsonl"}])
    assert parse_recipe(raw).steps[0].params["path"] == "out/x.jsonl"
    assert parse_recipe(raw, base=tmp_path).steps[0].params["path"] == str(tmp_path / "out" / "x.jsonl")
