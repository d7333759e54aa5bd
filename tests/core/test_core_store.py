"""Feature sets: alignment by uid, missing uids, atomic save/load round trip, cache keys."""

from __future__ import annotations

import numpy as np
import pytest

from curate.errors import MissingFeatureError, SchemaError
from curate.io.store import FeatureSet, FeatureStore, cache_key


def _fs() -> FeatureSet:
    return FeatureSet("embed/prompt", np.array(["a", "b", "c"]), np.arange(6, dtype=np.float32).reshape(3, 2), {"cache_key": "k"})


def test_align_reorders_by_uid():
    np.testing.assert_array_equal(_fs().align(["c", "a"]), [[4, 5], [0, 1]])


def test_missing_uids_are_listed():
    with pytest.raises(MissingFeatureError, match=r"lacks 2 of 3 uids.*'x'"):
        _fs().align(["a", "x", "y"])


def test_shape_and_duplicate_checks():
    with pytest.raises(SchemaError):
        FeatureSet("f", np.array(["a"]), np.zeros((2, 3)))
    with pytest.raises(SchemaError, match="duplicated"):
        FeatureSet("f", np.array(["a", "a"]), np.zeros((2, 3)))


def test_store_round_trip_and_stale_key(tmp_path):
    store = FeatureStore(tmp_path)
    store.put(_fs())
    assert "embed/prompt" in store and store.names() == ["embed/prompt"]
    back = store.get("embed/prompt", key="k")
    np.testing.assert_array_equal(back.align(["b"]), [[2, 3]])
    assert store.get("embed/prompt", key="other") is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_cache_key_depends_on_uids_order_and_params():
    assert cache_key(["a", "b"], {"m": 1}) != cache_key(["b", "a"], {"m": 1})
    assert cache_key(["a"], {"m": 1}) != cache_key(["a"], {"m": 2})
    assert cache_key(["a"], {"m": 1, "n": 2}) == cache_key(["a"], {"n": 2, "m": 1})
