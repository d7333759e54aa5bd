"""Crash-safe resume: SIGKILL a multi-step run at random points, rerun, and get byte-identical outputs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

RECIPE = """
name: resume
seed: 7
inputs: ["{data}/alpaca/alpaca_5000.json"]
output: {out}
steps:
  - use: filter
  - use: exact_dedup
    level: prompt
  - use: minhash_dedup
    threshold: 0.7
  - use: sample
    n: 1500
"""


def _curate(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("curate")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "curate.cli", *args]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path, data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=data_dir, out=tmp_path / "runs"))
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    subprocess.run(_curate("run", str(recipe), "-o", str(clean), "--quiet"), check=True, capture_output=True)
    t0 = time.time()
    subprocess.run(_curate("run", str(recipe), "-o", str(tmp_path / "timing"), "--quiet"), check=True, capture_output=True)
    full = time.time() - t0

    rng = random.Random(0)
    kills = 0
    for _ in range(8):  # bounded: at most 8 crashes
        proc = subprocess.Popen(_curate("run", str(recipe), "-o", str(crashed), "--quiet"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, full))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    done = subprocess.run(_curate("run", str(recipe), "-o", str(crashed), "--quiet"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert kills >= 1
    assert (crashed / "curated.parquet").read_bytes() == (clean / "curated.parquet").read_bytes()
    assert (crashed / "rejected.parquet").read_bytes() == (clean / "rejected.parquet").read_bytes()
    ingest = pl.read_parquet(crashed / "steps/00-ingest/table.parquet")
    cur, rej = pl.read_parquet(crashed / "curated.parquet"), pl.read_parquet(crashed / "rejected.parquet")
    uids = cur["uid"].to_list() + rej["uid"].drop_nulls().to_list()
    assert sorted(uids) == sorted(ingest["uid"].to_list())  # nothing lost, nothing duplicated
    assert not list(crashed.rglob(".*.tmp"))  # no temp files left under final names
