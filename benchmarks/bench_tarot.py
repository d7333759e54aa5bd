"""TAROT fixed-size selection: the truncated-kernel tie-break solver against the dense one, same run.

Two inputs:

* synthetic Gaussian-mixture features (default N = 100,000, d = 256, M = 1,000): 50 pool clusters
  (3 of them hold 30% of the pool), targets drawn from those 3 with weights .6/.3/.1;
* real features (``--features DIR --target-features DIR``, folders with ``values.npy`` as ``curate
  embed`` writes them), e.g. the demo recipe's MiniLM prompt embeddings (N = 6,967, M = 3,554), where
  the first nearest-neighbour layer already exceeds the 10% budget and the tie-break is an OT solve
  of ~1,900 × 3,554 points at ε = 1e-3.

For each ``--solver`` (default: both, the dense one being the previous implementation) the whole
``TarotSelector.select`` is timed in this process, one after the other on the same features; the line
records both times, whether the kept rows are identical, the load average (the 2-core machine is
shared) and, for synthetic data, the share of the selection in the target clusters.

    python benchmarks/bench_tarot.py --quick
    python benchmarks/bench_tarot.py                       # N=100000 d=256 M=1000 budget=0.1
    python benchmarks/bench_tarot.py --features RUN/features/embed__prompt \\
        --target-features RUN/features/embed__prompt__targets          # the demo's TAROT step
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import peak_rss_mb, record  # noqa: E402

from curate.features.store import FeatureSet  # noqa: E402
from curate.selectors import TarotSelector  # noqa: E402
from curate.testing import uid_frame  # noqa: E402


def synthetic(n: int, d: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool, targets, pool cluster labels) of the Gaussian-mixture world in the module doc."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.normal(size=(50, d)).astype(np.float32)
    probs = np.r_[[0.1, 0.1, 0.1], np.full(47, 0.7 / 47)]
    lab = rng.choice(50, size=n, p=probs)
    pool = centres[lab] + rng.normal(size=(n, d)).astype(np.float32)
    tlab = rng.choice(3, size=m, p=[0.6, 0.3, 0.1])
    return pool, centres[tlab] + rng.normal(size=(m, d)).astype(np.float32), lab


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=20000, d=64, M=200")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--m", type=int, default=1000)
    p.add_argument("--features", type=Path, help="pool feature folder (values.npy) instead of synthetic data")
    p.add_argument("--target-features", type=Path, help="target feature folder (values.npy)")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--solver", choices=["both", "truncated", "dense"], default="both")
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
    import ot  # noqa: F401  (imported up front: its first import costs seconds that are not TAROT's)

    lab = None
    if args.features is not None:
        if args.target_features is None:
            p.error("--features needs --target-features")
        pool = np.load(args.features / "values.npy")
        tgt = np.load(args.target_features / "values.npy")
        data = f"features:{args.features.name}"
    else:
        pool, tgt, lab = synthetic(args.n, args.d, args.m, args.seed)
        data = "synthetic"
    table = uid_frame(len(pool))
    feats = {"feats": FeatureSet("f", np.asarray(table["uid"].to_list(), dtype=object), pool),
             "target_feats": FeatureSet("t", np.asarray([f"t{j:06d}" for j in range(len(tgt))], dtype=object), tgt)}
    solvers = ["truncated", "dense"] if args.solver == "both" else [args.solver]
    runs: dict[str, dict] = {}
    for solver in solvers:
        load0 = os.getloadavg()[0]
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = TarotSelector(ot_solver=solver).select(table, feats, args.budget, seed=args.seed)
        secs = time.perf_counter() - t
        frame = res.frame
        runs[solver] = {
            "seconds": round(secs, 2), "load_avg_1m": [round(load0, 1), round(os.getloadavg()[0], 1)],
            "kept": sorted(res.kept_uids), "n_kept": res.n_kept,
            "tie_break_rows": int((frame["reason"] == "kept_tie_break").sum() + (frame["reason"] == "dropped_tie_break").sum()),
            "warnings": sorted({str(w.message)[:80] for w in caught}),
        }
        if lab is not None:
            kept = np.array([int(u[1:]) for u in res.kept_uids])
            share = np.bincount(lab[kept], minlength=50)[:3] / max(len(kept), 1)
            runs[solver]["in_target_clusters"] = round(float(share.sum()), 3)
    params = {"data": data, "n": len(pool), "d": int(pool.shape[1]), "m": len(tgt), "budget": args.budget,
              "solvers": solvers, "threads": args.threads}
    metrics: dict = {}
    for solver, r in runs.items():
        metrics[f"{solver}_s"] = r["seconds"]
        metrics[f"{solver}_load_avg"] = r["load_avg_1m"]
        if r["warnings"]:
            metrics[f"{solver}_warnings"] = r["warnings"]
        if "in_target_clusters" in r:
            metrics[f"{solver}_in_target_clusters"] = r["in_target_clusters"]
    first = runs[solvers[0]]
    metrics.update({"n_kept": first["n_kept"], "tie_break_rows": first["tie_break_rows"], "peak_rss_mb": peak_rss_mb()})
    if len(runs) == 2:
        metrics["speedup"] = round(runs["dense"]["seconds"] / max(runs["truncated"]["seconds"], 1e-9), 1)
        metrics["same_picks"] = runs["dense"]["kept"] == runs["truncated"]["kept"]
        metrics["picks_differing"] = len(set(runs["dense"]["kept"]) ^ set(runs["truncated"]["kept"])) // 2
    notes = ("TarotSelector.select wall time per tie-break solver in one process (dense = the previous "
             "implementation: annealed dense log-domain Sinkhorn; truncated = truncated kernel + Newton), "
             "load_avg = 1-minute load average before/after on the shared machine")
    return [record("tarot_fixed_size/solvers", params, metrics, notes=notes)]


if __name__ == "__main__":
    main()
