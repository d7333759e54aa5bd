"""Shared helpers of the benchmark scripts: machine facts, timing with peak memory, JSON lines.

Each result is one JSON line appended to ``benchmarks/results.jsonl``::

    {"bench": ..., "command": ..., "machine": {...}, "versions": {...}, "params": {...}, "metrics": {...}, "time": ...}

``python benchmarks/make_results.py`` regenerates RESULTS.md from that file.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
DATA = HERE.parent.parent / "shared" / "data"

_PACKAGES = ("curate", "numpy", "polars", "torch", "transformers", "sentence-transformers", "faiss-cpu", "POT",
             "datasketch", "scikit-learn", "ray", "datatrove")


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def versions() -> dict[str, str]:
    out = {}
    for p in _PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            continue
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t["seconds"]``."""
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Fastest wall time of ``repeat`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def record(bench: str, params: dict[str, Any], metrics: dict[str, Any], *, notes: str = "") -> dict[str, Any]:
    """Append one result line to results.jsonl and print it."""
    line = {
        "bench": bench,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], HERE.parent)] + sys.argv[1:]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "versions": versions(),
        "params": params,
        "metrics": metrics,
        "notes": notes,
    }
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")
    print(json.dumps(line, default=str))
    return line
