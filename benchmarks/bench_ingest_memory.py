"""Peak memory of ingesting a large parquet file: the whole-file reader against the batched reader.

Rows: the 5,000 real Alpaca rows repeated with a row number appended to the instruction (so every
row is distinct), written once as parquet (not measured). Each reader runs in its own subprocess,
so its peak RSS (``ru_maxrss``) is its own (the file is written by another subprocess: a child's
``ru_maxrss`` starts at its parent's peak); the RSS after importing curate (``baseline``) is
reported too, so ``peak - baseline`` is what reading cost. Single-threaded polars
(``POLARS_MAX_THREADS=1``).

- ``whole_file``: ``curate.io.readers.read_sources`` (the file reader: the whole table as Python
  row objects, then the records);
- ``batched``: ``curate.read_sources`` (Arrow record batches of 10,000 rows converted as they come);
- ``dataset``: a memory-mapped ``datasets.Dataset`` of the same file, read in batches (in-memory input).

Every reader must give the same uids (checked through a hash of the uid column).

    .venv/bin/python benchmarks/bench_ingest_memory.py --quick   # 1e5 rows
    .venv/bin/python benchmarks/bench_ingest_memory.py           # 1e6 rows

``CURATE_BENCH_DRY=1`` prints the numbers without appending them to results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, record  # noqa: E402

CHILD = r"""
import hashlib, json, resource, sys, time
import curate, curate.io.readers
mode, path = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
if mode == "whole_file":
    res = curate.io.readers.read_sources([path])
elif mode == "batched":
    res = curate.read_sources([path])
else:
    import datasets
    res = curate.read_sources(datasets.Dataset.from_parquet(path, cache_dir=sys.argv[3]))
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
uids = hashlib.sha256("\n".join(res.table["uid"].to_list()).encode()).hexdigest()
print(json.dumps({"rows": res.table.height, "seconds": round(secs, 2), "baseline_mb": round(base, 1),
                  "peak_rss_mb": round(peak, 1), "uids_sha256": uids}))
"""


def write_pool(n: int, path: Path) -> None:
    import polars as pl

    base = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())
    rows = [{"instruction": f"{base[i % len(base)]['instruction']} (#{i})", "input": base[i % len(base)]["input"],
             "output": base[i % len(base)]["output"]} for i in range(n)]
    pl.DataFrame(rows).write_parquet(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1e5 rows instead of 1e6")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write:
        write_pool(args.rows, Path(args.write))
        return
    n = args.rows or (100_000 if args.quick else 1_000_000)
    env = {**os.environ, "POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="curate-ingest-mem-") as tmp:
        path = Path(tmp) / "pool.parquet"
        # in a subprocess: a child's ru_maxrss starts at its parent's peak, so the parent stays small
        subprocess.run([sys.executable, __file__, "--write", str(path), "--rows", str(n)], check=True, env=env)
        metrics: dict[str, dict] = {}
        for mode in ("whole_file", "batched", "dataset"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(Path(tmp) / "hf")],
                                 capture_output=True, text=True, env=env, check=True)
            metrics[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(mode, metrics[mode], flush=True)
    same = len({m["uids_sha256"] for m in metrics.values()}) == 1
    for m in metrics.values():
        m["read_mb"] = round(m["peak_rss_mb"] - m["baseline_mb"], 1)
    if os.environ.get("CURATE_BENCH_DRY"):
        return
    record("ingest_memory", {"rows": n, "file": "parquet", "batch_rows": 10_000},
           {**metrics, "same_uids": same,
            "peak_ratio_batched_vs_whole": round(metrics["batched"]["read_mb"] / metrics["whole_file"]["read_mb"], 3)},
           notes="peak RSS per reader in its own process; read_mb = peak - RSS after import")


if __name__ == "__main__":
    main()
