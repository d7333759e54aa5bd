"""TAROT fixed-size selection at scale (N = 100,000, d = 256, M = 1,000, ≤ 60 s on 2 cores).

Synthetic Gaussian-mixture features: 50 pool clusters (3 of them hold 30% of the pool), targets drawn
from those 3 with weights .6/.3/.1. Reports the
wall time per phase (whitening, kNN table, walk + last-layer OT potentials), the peak RSS and the
share of the selection in the target clusters. Appends one JSON line to benchmarks/results.jsonl.

    .venv/bin/python benchmarks/bench_tarot.py --quick
    .venv/bin/python benchmarks/bench_tarot.py            # N=100000 d=256 M=1000 budget=0.1
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.features.store import FeatureSet  # noqa: E402
from curate.selectors import TarotSelector  # noqa: E402
from curate.testing import uid_frame  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=20000, d=64, M=200")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--m", type=int, default=1000)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--tie-break", default="min_potential")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d, args.m = 20_000, 64, 200
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    rng = np.random.default_rng(args.seed)
    centres = 3.0 * rng.normal(size=(50, args.d)).astype(np.float32)
    probs = np.r_[[0.1, 0.1, 0.1], np.full(47, 0.7 / 47)]  # the 3 target clusters hold 30% of the pool
    lab = rng.choice(50, size=args.n, p=probs)
    pool = centres[lab] + rng.normal(size=(args.n, args.d)).astype(np.float32)
    tlab = rng.choice(3, size=args.m, p=[0.6, 0.3, 0.1])
    tgt = centres[tlab] + rng.normal(size=(args.m, args.d)).astype(np.float32)
    table = uid_frame(args.n)
    feats = {"feats": FeatureSet("f", np.asarray(table["uid"].to_list(), dtype=object), pool),
             "target_feats": FeatureSet("t", np.asarray([f"t{j:06d}" for j in range(args.m)], dtype=object), tgt)}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = TarotSelector(tie_break=args.tie_break).select(table, feats, args.budget, seed=args.seed)
    total = time.perf_counter() - t
    kept = np.array([int(u[1:]) for u in res.kept_uids])
    share = np.bincount(lab[kept], minlength=50)[:3] / max(len(kept), 1)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rec = {
        "bench": "tarot_fixed_size", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(["bench_tarot.py", *(argv or sys.argv[1:])]),
        "n": args.n, "d": args.d, "m": args.m, "budget": args.budget, "n_kept": res.n_kept,
        "seconds": round(total, 2), "peak_rss_mb": round(rss1 / 1024, 1), "rss_before_mb": round(rss0 / 1024, 1),
        "input_mb": round((pool.nbytes + tgt.nbytes) / 2**20, 1),
        "target_cluster_share": [round(float(x), 3) for x in share], "in_target_clusters": round(float(share.sum()), 3),
        "warnings": sorted({str(w.message)[:80] for w in caught}), "threads": args.threads,
        "machine": platform.machine(),
    }
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec))
    return rec


if __name__ == "__main__":
    main()
