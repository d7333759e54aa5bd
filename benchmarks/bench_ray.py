"""Ray vs local executor: MinHash signatures and embeddings over the same shards.

Both executors run the same shard function over the same row shards of real data (Alpaca +
CodeAlpaca): ``curate.curation.minhash.signature_shard`` (word 5-gram MinHash, 128 permutations)
and a MiniLM embedding shard (``curate.embed_texts``). Reported per workload: rows/s local, rows/s
Ray (``RayExecutor(num_cpus=2)``, a local Ray started in this process; its start-up time is
reported apart), the overhead ratio Ray/local (target: <= 1.3 on the same machine),
and whether the outputs are identical (signatures: bit-equal; embeddings: max abs difference).
Each workload runs once untimed first (Ray workers import curate and load the model; the
local process loads the model), then ``--repeat`` timed runs, best kept.

On one 2-core machine Ray cannot be faster than local: it adds process start-up, pickling and
scheduling; it pays off only across nodes (see RESULTS_NOTES.md, "How each stage scales").

    python benchmarks/bench_ray.py --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, best_of, peak_rss_mb, record  # noqa: E402


def embed_shard(payload: tuple[list[str], int]) -> np.ndarray:
    """One embedding shard with ``threads`` torch threads (module-level so Ray pickles it by reference)."""
    import torch

    texts, threads = payload
    torch.set_num_threads(threads)
    from curate.features.embed import embed_texts

    return np.asarray(embed_texts(texts, device="cpu", batch_size=32), dtype=np.float32)


def load_texts(n: int) -> list[str]:
    from curate.io import read_sources
    from curate.schema import texts

    table = read_sources([DATA / "alpaca" / "alpaca_5000.json", DATA / "codealpaca" / "code_alpaca_2k.json"]).table
    out = texts(table, "prompt+response")
    reps = -(-n // len(out))
    return (out * reps)[:n]


def shards(items: list[Any], shard_size: int) -> list[list[Any]]:
    return [items[i : i + shard_size] for i in range(0, len(items), shard_size)]


def compare(name: str, fn: Any, payloads: list[Any], n_rows: int, local: Any, ray_ex: Any, repeat: int,
            params: dict[str, Any], equal: Any, ray_payloads: list[Any] | None = None) -> dict[str, Any]:
    ray_payloads = payloads if ray_payloads is None else ray_payloads
    local.map(fn, payloads[:2])  # warm-up: model load / imports in this process
    ray_ex.map(fn, ray_payloads)  # warm-up: every Ray worker imports curate (and loads the model)
    t_local, out_local = best_of(lambda: local.map(fn, payloads), repeat)
    t_ray, out_ray = best_of(lambda: ray_ex.map(fn, ray_payloads), repeat)
    metrics = {"rows": n_rows, "shards": len(payloads), "local_s": round(t_local, 3), "ray_s": round(t_ray, 3),
               "local_rows_per_s": round(n_rows / t_local, 1), "ray_rows_per_s": round(n_rows / t_ray, 1),
               "ray_over_local": round(t_ray / t_local, 3), **equal(out_local, out_ray), "peak_rss_mb": peak_rss_mb()}
    metrics["within_1_3x"] = metrics["ray_over_local"] <= 1.3
    record(f"ray/{name}", params, metrics,
           notes="same shards, same shard function; best of --repeat after one untimed warm-up run per executor")
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4,000 MinHash rows, 256 embedding rows")
    ap.add_argument("--n-minhash", type=int, default=40_000)
    ap.add_argument("--n-embed", type=int, default=2_048)
    ap.add_argument("--shard-size", type=int, default=None, help="rows per shard [minhash 1000, embed 128]")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.n_minhash, args.n_embed, args.repeat = 4_000, 256, 1
    import torch

    torch.set_num_threads(2)
    from curate.curation.minhash import SignatureConfig, signature_shard
    from curate.pipeline.executors import LocalExecutor, RayExecutor

    local = LocalExecutor()
    ray_ex = RayExecutor(num_cpus=args.num_cpus)
    t0 = time.perf_counter()
    ray = ray_ex._ray()
    ray_init_s = time.perf_counter() - t0
    try:
        texts = load_texts(max(args.n_minhash, args.n_embed))
        cfg = SignatureConfig()
        mh_size = args.shard_size or 1000
        mh_payloads = [(s, cfg) for s in shards(texts[: args.n_minhash], mh_size)]

        def sig_equal(a: list[Any], b: list[Any]) -> dict[str, Any]:
            same = all(all(np.array_equal(x, y) for x, y in zip(pa, pb, strict=True)) for pa, pb in zip(a, b, strict=True))
            return {"identical": bool(same)}

        compare("minhash_signatures", signature_shard, mh_payloads, args.n_minhash, local, ray_ex, args.repeat,
                {"n_rows": args.n_minhash, "shard_size": mh_size, "num_perm": cfg.num_perm, "num_cpus": args.num_cpus,
                 "ray_init_s": round(ray_init_s, 2), "quick": args.quick}, sig_equal)

        em_size = args.shard_size or 128
        em_shards = shards(texts[: args.n_embed], em_size)
        # local: one process with all cores; Ray: num_cpus tasks with one thread each (same total cores)
        em_payloads = [(s, args.num_cpus) for s in em_shards]
        em_ray = [(s, 1) for s in em_shards]

        def emb_equal(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
            diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))
            return {"max_abs_diff": diff, "identical": diff == 0.0, "equal_within_1e-5": diff <= 1e-5}

        compare("embed", embed_shard, em_payloads, args.n_embed, local, ray_ex, args.repeat,
                {"n_rows": args.n_embed, "shard_size": em_size, "model": "all-MiniLM-L6-v2",
                 "torch_threads": f"local {args.num_cpus}, ray 1 per task", "num_cpus": args.num_cpus,
                 "quick": args.quick}, emb_equal, em_ray)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
