"""BIDS: exact pruned fast path vs the naive Algorithm-1 loop (docs/methods/less-bids.md B.4).

Random normal influence scores, column z-scored, budget = fraction·N. Both paths run in this
process; the picks must be identical. At full scale (N = 300,000, M = 350, 15%) the naive loop
would take about an hour on 2 cores, so it runs the first ``--naive-steps`` steps (its per-step
cost is constant, N·M) and its total is extrapolated; the fast path runs to the full budget and
its first steps are checked against the naive ones.

    .venv/bin/python benchmarks/bench_bids.py --quick
    .venv/bin/python benchmarks/bench_bids.py             # N=300000 M=350 fraction=0.15
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.selectors.bids import bids_naive, bids_pruned, bids_rowmax, column_zscore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=20000, M=350, naive loop run in full")
    p.add_argument("--n", type=int, default=300_000)
    p.add_argument("--m", type=int, default=350)
    p.add_argument("--fraction", type=float, default=0.15)
    p.add_argument("--naive-steps", type=int, default=None, help="naive steps to run (default: all in --quick, 200 otherwise)")
    p.add_argument("--rowmax", action="store_true", help="also time the spec's row-max-bound search (B.4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.n = 20_000
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    rng = np.random.default_rng(args.seed)
    a = rng.normal(size=(args.n, args.m))
    at, _ = column_zscore(a)
    budget = int(np.floor(args.fraction * args.n))
    naive_steps = budget if args.naive_steps is None and args.quick else (args.naive_steps or 200)
    naive_steps = min(naive_steps, budget)

    t = time.perf_counter()
    p_fast, g_fast, *_ = bids_pruned(at, budget)
    fast_s = time.perf_counter() - t
    t = time.perf_counter()
    p_naive, g_naive, *_ = bids_naive(at, naive_steps)
    naive_s = time.perf_counter() - t
    rowmax_s = None
    if args.rowmax:
        t = time.perf_counter()
        p_row, *_ = bids_rowmax(at, naive_steps)
        rowmax_s = round(time.perf_counter() - t, 3)
        assert np.array_equal(p_row, p_naive)
    identical = bool(np.array_equal(p_fast[:naive_steps], p_naive) and np.array_equal(g_fast[:naive_steps], g_naive))
    naive_total = naive_s * budget / naive_steps
    rec = {
        "bench": "bids_prune", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(["bench_bids.py", *(argv or sys.argv[1:])]),
        "n": args.n, "m": args.m, "budget": budget, "fast_s": round(fast_s, 3),
        "naive_steps": naive_steps, "naive_s": round(naive_s, 3), "naive_extrapolated": naive_steps < budget,
        "naive_total_s": round(naive_total, 3), "speedup": round(naive_total / fast_s, 2),
        "identical_picks": identical, "rowmax_s_same_steps": rowmax_s, "threads": args.threads, "machine": platform.machine(),
    }
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main()
