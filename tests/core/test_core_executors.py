"""Executors: local and Ray give identical ordered results; shard caches make reruns resume."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from curate.pipeline.executors import LocalExecutor, RayExecutor, shard_key, sharded_map, split
from curate.pipeline.step import StepContext


def test_split_covers_every_row_once():
    ranges = split(10, 3)
    assert ranges == [(0, 3), (3, 6), (6, 9), (9, 10)]
    with pytest.raises(ValueError):
        split(3, 0)


def test_shard_key_depends_on_uids_and_params():
    assert shard_key(["a", "b"], {"p": 1}) != shard_key(["a", "b"], {"p": 2})
    assert shard_key(["a", "b"], {"p": 1}) != shard_key(["b", "a"], {"p": 1})


def test_resume_recomputes_only_missing_shards(tmp_path):
    calls: list[int] = []

    def fn(x: int) -> int:
        calls.append(x)
        return x * 10

    uids = [[f"u{i}"] for i in range(5)]
    first = sharded_map(fn, list(range(5)), uids, params={"v": 1}, cache_dir=tmp_path)
    assert first == [0, 10, 20, 30, 40] and calls == [0, 1, 2, 3, 4]
    # Simulate a crash that lost two shards: only those are recomputed.
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 5 and not list(tmp_path.glob("*.pkl"))
    next(tmp_path.glob(f"{shard_key(['u1'], {'v': 1})}-*")).unlink()
    next(tmp_path.glob(f"{shard_key(['u3'], {'v': 1})}-*")).unlink()
    calls.clear()
    assert sharded_map(fn, list(range(5)), uids, params={"v": 1}, cache_dir=tmp_path) == first
    assert calls == [1, 3]
    # Changed parameters never reuse stale shards.
    calls.clear()
    sharded_map(fn, list(range(5)), uids, params={"v": 2}, cache_dir=tmp_path)
    assert calls == [0, 1, 2, 3, 4]


def test_map_shards_on_context_matches_unsharded(tmp_path):
    t = pl.DataFrame({"uid": [f"{i:032x}" for i in range(23)], "x": np.arange(23)})
    ctx = StepContext(step_dir=tmp_path, executor=LocalExecutor())
    parts = ctx.map_shards(lambda s: s["x"].sum(), t, params={}, shard_size=5)
    assert len(parts) == 5 and sum(parts) == t["x"].sum()


@pytest.mark.slow
def test_ray_and_local_give_identical_results(tmp_path):
    pytest.importorskip("ray")
    rng = np.random.default_rng(0)
    payloads = [rng.normal(size=(50, 8)) for _ in range(7)]
    uids = [[f"s{i}"] for i in range(7)]
    # np.linalg.norm: importable on Ray workers (this test module is not).
    local = sharded_map(np.linalg.norm, payloads, uids, params={}, executor=LocalExecutor())
    ray_ex = RayExecutor(num_cpus=2)
    try:
        remote = sharded_map(np.linalg.norm, payloads, uids, params={}, executor=ray_ex, cache_dir=tmp_path)
    finally:
        import ray

        ray.shutdown()
    assert remote == local
