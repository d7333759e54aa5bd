"""Embedding throughput: curate ``embed_texts`` vs plain ``SentenceTransformer.encode``, same process.

Both use the same loaded all-MiniLM-L6-v2 object (same device, dtype, threads, batch size) on the
same real texts, so the ratio measures only what ``embed_texts`` does differently (token-length
sorting of pre-tokenised texts, no re-tokenisation per batch, identical texts embedded once).
Two workloads from ../shared/data:

- ``unique``: Alpaca rows (instruction + input + output), all texts distinct;
- ``prompts``: the ``prompt`` field of the AlpacaEval pool (the same 805 instructions answered by
  three models), i.e. every prompt three times, as when embedding prompts of a multi-answer pool.

Runs alternate (ours, baseline, ours, ...) and the fastest of the repeats counts, which keeps the
ratio stable on a shared machine. Outputs are checked to agree (max abs difference reported).

    .venv/bin/python benchmarks/bench_embed.py --quick
Appends one JSON line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def unique_texts(n: int) -> list[str]:
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n]
    return ["\n\n".join(p for p in (r["instruction"], r["input"], r["output"]) if p) for r in rows]


def prompt_texts(n_unique: int) -> list[str]:
    out: list[str] = []
    for name in ("gpt4", "alpaca-7b", "text_davinci_003"):
        rows = json.loads((DATA / "alpaca_eval" / f"{name}__model_outputs.json").read_text())[:n_unique]
        out.extend(r["instruction"] for r in rows)
    return out


def run(workload: str, docs: list[str], emb, batch_size: int, repeats: int) -> dict:
    from curate.features.embed import embed_texts

    model = emb.model
    tok = model.tokenizer(docs, truncation=True, max_length=model.max_seq_length)["input_ids"]
    n_tokens = int(sum(len(t) for t in tok))
    ours_s, base_s = [], []
    ours = base = None
    for _ in range(repeats):
        t = time.perf_counter()
        ours = embed_texts(docs, model=emb, batch_size=batch_size)
        ours_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        base = model.encode(docs, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        base_s.append(time.perf_counter() - t)
    o, b = min(ours_s), min(base_s)
    return {
        "workload": workload, "n": len(docs), "n_unique": len(set(docs)), "tokens": n_tokens,
        "curate_s": round(o, 3), "baseline_s": round(b, 3), "ratio": round(b / o, 3),
        "curate_texts_per_s": round(len(docs) / o, 1), "baseline_texts_per_s": round(len(docs) / b, 1),
        "curate_tokens_per_s": round(n_tokens / o, 1), "baseline_tokens_per_s": round(n_tokens / b, 1),
        "max_abs_diff": float(np.abs(np.asarray(ours) - np.asarray(base)).max()),
        "all_curate_s": [round(x, 3) for x in ours_s], "all_baseline_s": [round(x, 3) for x in base_s],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small workloads (CI / shared CPU)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the shared dev box has 2 cores)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()

    import torch

    from curate.features.embed import embed_texts, get_embedder

    torch.set_num_threads(args.threads)
    n_unique, n_prompts = (192, 128) if args.quick else (2000, 805)
    repeats = args.repeats or (2 if args.quick else 3)
    t = time.perf_counter()
    emb = get_embedder("default", device=args.device)
    load_s = time.perf_counter() - t
    warm = unique_texts(8)
    embed_texts(warm, model=emb)
    emb.model.encode(warm)
    results = [run("unique", unique_texts(n_unique), emb, args.batch_size, repeats),
               run("prompts", prompt_texts(n_prompts), emb, args.batch_size, repeats)]
    line = {
        "bench": "embed", "quick": args.quick, "model": emb.model_id, "device": emb.device, "dtype": emb.dtype,
        "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "repeats": repeats,
        "load_s": round(load_s, 2),
        "machine": {"node": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {p: version(p) for p in ("curate", "torch", "sentence-transformers", "transformers")},
        "baseline": "SentenceTransformer.encode(texts, batch_size, normalize_embeddings=True), same model object",
        "results": results,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    for r in results:
        print(f"{r['workload']:8s} n={r['n']:5d} ours {r['curate_s']:.2f}s ({r['curate_texts_per_s']} texts/s, "
              f"{r['curate_tokens_per_s']} tok/s)  baseline {r['baseline_s']:.2f}s  ratio {r['ratio']:.2f}x  "
              f"max|diff| {r['max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()
