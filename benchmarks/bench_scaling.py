"""Scaling of ingest + exact dedup + MinHash dedup with the number of rows: time, peak memory, exponent.

Rows: the 5,000 real Alpaca rows, perturbed into triples so that the duplicate structure is the
same at every size: row ``i`` belongs to triple ``g = i // 3``, whose text is Alpaca row ``g % 5000``
(variant ``v = g // 5000``; variants ``v > 0`` replace ~25% of the instruction's and of the output's
words, which puts them far below the threshold from each other); the triple is (the variant, an exact copy, a near-duplicate
with ~2% of the output's words replaced). So every size has one third exact and one third near
duplicates and clusters of three rows. (An earlier version repeated each Alpaca row n/5000 times,
so clusters grew with n and the candidate pairs per row grew with them: that measured the data, not
the algorithm; it gave a MinHash exponent of 1.60 between 1e4 and 1e5.)

Each size runs in its own subprocess (so peak RSS is that size's), single-threaded numpy/polars
(``POLARS_MAX_THREADS=1``, 2 shared cores here), and measures

- ingest: ``curate.io.read_sources`` of an Alpaca-format JSON file written beforehand (not timed),
- exact: ``exact_duplicates(level="pair")``,
- minhash: ``minhash_duplicates`` (word 5-grams of prompt+response, threshold 0.8, 128 permutations,
  exact verification),

and the fitted exponent ``b`` of ``time ~ a * n^b`` (least squares on log-log) per stage and total.

    .venv/bin/python benchmarks/bench_scaling.py --quick    # 1e4 and 1e5 rows
    .venv/bin/python benchmarks/bench_scaling.py            # 1e4, 1e5, 1e6 rows
Appends one JSON line per size and one for the fit to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, record  # noqa: E402


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Alpaca-format rows in triples (variant, exact copy, near copy); see the module docstring."""
    base = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())

    def edit(words: list[str], rate: float, rng: random.Random) -> list[str]:
        words = list(words)
        for _ in range(max(1, int(len(words) * rate)) if words else 0):
            words[rng.randrange(len(words))] = f"w{rng.randrange(10**7)}"
        return words

    rows = []
    for i in range(n):
        g, kind = divmod(i, 3)
        variant = g // len(base)
        r = base[g % len(base)]
        instruction, words = r["instruction"], r["output"].split()
        if variant:  # instruction and output both edited: variants must not share a prompt
            vr = random.Random(f"{seed}:variant:{g}")
            instruction = " ".join(edit(instruction.split(), 0.25, vr))
            words = edit(words, 0.25, vr)
        if kind == 2:
            words = edit(words, 0.02, random.Random(f"{seed}:near:{i}"))
        rows.append({"instruction": instruction, "input": r["input"], "output": " ".join(words)})
    return rows


def child(n: int, path: str) -> None:
    """Run the three stages on one file and print a JSON line (peak RSS is this process's)."""
    from curate.curation.exact import exact_duplicates
    from curate.curation.minhash import minhash_duplicates
    from curate.io import read_sources

    t0 = time.perf_counter()
    table = read_sources(path).table
    t1 = time.perf_counter()
    ex = exact_duplicates(table, "pair")
    t2 = time.perf_counter()
    mh = minhash_duplicates(table, field="prompt+response", threshold=0.8, num_perm=128, seed=1)
    t3 = time.perf_counter()
    print(json.dumps({
        "n_rows": table.height, "ingest_s": t1 - t0, "exact_s": t2 - t1, "minhash_s": t3 - t2, "total_s": t3 - t0,
        "exact_dups": int((~ex["keep"]).sum()), "minhash_dups": int((~mh["keep"]).sum()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


def fit_exponent(ns: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1e4 and 1e5 rows only")
    ap.add_argument("--sizes", type=int, nargs="*", help="override the row counts")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("N", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    env = {**os.environ, "POLARS_MAX_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"alpaca_{n}.json"
            path.write_text(json.dumps(make_rows(n)))
            out = subprocess.run([sys.executable, __file__, "--child", str(n), str(path)], env=env, check=True,
                                 capture_output=True, text=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res = {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}
            res["rows_per_s"] = round(n / res["total_s"], 1)
            results.append(res)
            print(json.dumps(res))
            if not args.no_record:
                record("scaling/size", {"n_rows": n, "threshold": 0.8, "num_perm": 128, "shingles": "word 5-grams",
                                        "field": "prompt+response", "threads": 1,
                                        "data": "triples-v2"}, res)
            path.unlink()
    if len(results) >= 2:
        ns = [r["n_rows"] for r in results]
        fit = {f"exponent_{k}": round(fit_exponent(ns, [r[f"{k}_s"] for r in results]), 3)
               for k in ("ingest", "exact", "minhash", "total")}
        fit["peak_rss_mb_max"] = max(r["peak_rss_mb"] for r in results)
        print(json.dumps(fit))
        if not args.no_record:
            record("scaling/fit", {"sizes": ns, "data": "triples-v2"}, fit)


if __name__ == "__main__":
    main()
