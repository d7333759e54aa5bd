"""Run datatrove's MinHash dedup (stages 1-3) on a JSONL pool; called by bench_dedup_quality.py.

Runs inside its own virtual environment (``/work/venvs/datatrove``: datatrove pins versions the
curate venv does not share), so it imports nothing from curate. Input: one JSON string (the row
text) per line. Output JSON: ``{"labels": [...], "seconds": s, "peak_rss_mb": m, "base_rss_mb": b}``
where ``labels[i]`` is the smallest pool index of row ``i``'s cluster.

    python _datatrove_minhash.py POOL.jsonl OUT.json [--buckets 14 --rows 8 --ngram 5 --workers 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import struct
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    """Peak resident memory of this process (VmHWM, which unlike ru_maxrss does not carry over the
    parent's peak across fork + exec) and of any worker it forked (MiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            own = int(line.split()[1])
    return round(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pool")
    ap.add_argument("out")
    ap.add_argument("--buckets", type=int, default=14)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--ngram", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from loguru import logger

    logger.remove()
    logging.disable(logging.WARNING)
    docs = [json.loads(line) for line in Path(args.pool).read_text(encoding="utf-8").splitlines()]
    base = _rss_mb()
    # datatrove's defaults (its text normalisation, its English word tokenizer), as a user runs it.
    cfg = MinhashConfig(n_grams=args.ngram, num_buckets=args.buckets, hashes_per_bucket=args.rows, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        documents = [Document(text=d, id=str(i)) for i, d in enumerate(docs)]
        sig, buckets, clusters = work / "sigs", work / "buckets", work / "clusters"
        LocalPipelineExecutor([documents, MinhashDedupSignature(output_folder=str(sig), config=cfg)],
                              tasks=1, workers=1, logging_dir=str(work / "log1")).run()
        LocalPipelineExecutor([MinhashDedupBuckets(input_folder=str(sig), output_folder=str(buckets), config=cfg)],
                              tasks=args.buckets, workers=args.workers, logging_dir=str(work / "log2")).run()
        LocalPipelineExecutor([MinhashDedupCluster(input_folder=str(buckets), output_folder=str(clusters), config=cfg,
                                                   save_cluster_id=True)],
                              tasks=1, workers=1, logging_dir=str(work / "log3")).run()
        seconds = time.perf_counter() - t0
        labels = list(range(len(docs)))
        path = clusters / "000000.clusters"
        if path.exists():
            first: dict[int, int] = {}
            pairs = list(struct.iter_unpack("<2I", path.read_bytes()))
            for doc, cid in pairs:
                first[cid] = min(first.get(cid, doc), doc)
            for doc, cid in pairs:
                labels[doc] = first[cid]
    from importlib.metadata import version

    Path(args.out).write_text(json.dumps({"labels": labels, "seconds": seconds, "peak_rss_mb": _rss_mb(),
                                          "base_rss_mb": base, "version": version("datatrove")}))


if __name__ == "__main__":
    main()
