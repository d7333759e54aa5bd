"""MinHash-LSH near-dup dedup: throughput (docs/s) and F1 against exact Jaccard, curate vs datatrove.

Pool: real Alpaca rows (``../shared/data/alpaca/alpaca_5000.json``, instruction + input + output)
plus planted copies with ~1% of their words replaced (their Jaccard to the source spreads around
the threshold: long rows stay near 0.9, short rows fall below 0.8). The pool construction is the
one the issue's first measurement used; it is not tuned here.

Same shingles for everyone: every document is first reduced to curate's normalised word tokens
joined by single spaces; datatrove gets that text with a whitespace word tokenizer and its text
normalisation switched off, so both sides shingle word 5-grams of the same tokens. Both use
``num_perm`` hash functions and the same Jaccard threshold.

Compared, in one process on the same pool:

- ``curate``: :func:`curate.curation.minhash_duplicates` (default: exact verification of candidate
  pairs, bands chosen for recall at the threshold).
- ``curate_signature_verify``: the previous method (signature-estimated verification, datasketch's
  balanced bands), as an ablation.
- ``datatrove``: datatrove's MinHash pipeline, stages 1-3 (signatures, buckets, clusters) with
  ``LocalPipelineExecutor(workers=1)`` in a temp folder, ``num_buckets x hashes_per_bucket`` equal
  to datasketch's balanced (bands, rows) for the threshold (its natural configuration for that
  threshold; datatrove has no verification step). Stage 4 (filtering the documents) is not timed,
  so datatrove is timed on less work than curate (which returns every row's decision).
- ``datasketch``: one ``datasketch.MinHash`` per row + ``MinHashLSH`` + union-find (text-dedup style).

Ground truth: connected components of the graph "exact Jaccard of word 5-gram sets >= threshold"
(all pairs that share a 5-gram are checked). Metrics against it:

- ``pair_f1``: F1 over unordered pairs placed in the same cluster (the strict one: a wrongly merged
  or split big cluster costs quadratically many pairs).
- ``row_f1``: F1 over rows marked as duplicates (every cluster member but the earliest row).

    .venv/bin/python benchmarks/bench_minhash.py --quick     # 2,400 docs, ~1 minute
    .venv/bin/python benchmarks/bench_minhash.py             # 6,000 docs
Appends one JSON line per method to benchmarks/results.jsonl (via benchmarks/_common.record).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, record  # noqa: E402

from curate.curation._common import jaccard, shingle_strings, word_tokens  # noqa: E402
from curate.curation.minhash import lsh_params, minhash_duplicates, recall_bands  # noqa: E402
from curate.schema import dedupe_uids, make_record, message, texts, to_frame  # noqa: E402

NGRAM = 5


def pool(n_base: int, n_dups: int, seed: int = 0) -> list[str]:
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n_base]
    docs = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    rng = random.Random(seed)
    for _ in range(n_dups):
        words = rng.choice(docs).split()
        for _ in range(max(1, len(words) // 100)):  # ~1% word edits
            words[rng.randrange(len(words))] = f"x{rng.randrange(10**6)}"
        docs.append(" ".join(words))
    return [" ".join(word_tokens(d)) for d in docs]  # the shared normalised text


# ------------------------------------------------------------------ truth and metrics
def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _canon(labels: list) -> list[int]:
    """Relabel clusters by their earliest member (so labels compare across methods)."""
    first: dict = {}
    return [first.setdefault(lab, i) for i, lab in enumerate(labels)]


def exact_labels(docs: list[str], threshold: float) -> tuple[list[int], int]:
    """Connected components of exact Jaccard >= threshold; every pair sharing a shingle is checked."""
    sets = [shingle_strings(d, ngram=NGRAM) for d in docs]
    inv = defaultdict(list)
    for i, s in enumerate(sets):
        for sh in s:
            inv[sh].append(i)
    cand = set()
    for lst in inv.values():
        cand.update(itertools.combinations(lst, 2))
    parent = list(range(len(docs)))
    n_edges = 0
    for a, b in cand:
        if jaccard(sets[a], sets[b]) >= threshold:
            n_edges += 1
            parent[_find(parent, a)] = _find(parent, b)
    return _canon([_find(parent, i) for i in range(len(docs))]), n_edges


def pairs_of(labels: list[int]) -> set[tuple[int, int]]:
    groups = defaultdict(list)
    for i, lab in enumerate(labels):
        groups[lab].append(i)
    return {p for g in groups.values() if len(g) > 1 for p in itertools.combinations(g, 2)}


def dup_rows(labels: list[int]) -> set[int]:
    """Rows that are not the earliest member of their cluster (labels are canonical)."""
    return {i for i, lab in enumerate(labels) if lab != i}


def f1(pred: set, truth: set) -> dict[str, float]:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 1.0
    r = tp / len(truth) if truth else 1.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 4)}


# ------------------------------------------------------------------ methods
def as_table(docs: list[str]) -> pl.DataFrame:
    """The pool as a canonical table (built once, outside the timed region)."""
    records = [make_record("sft", messages=[message("user", "q"), message("assistant", d)]) for d in docs]
    dedupe_uids(records)
    table = to_frame(records)
    assert texts(table, "response") == docs
    # Keep rule = earliest row: uids are content hashes, so give the pool order as source lines.
    return table.with_columns(source=pl.lit("pool"), source_line=np.arange(len(docs)))


def run_curate(table: pl.DataFrame, threshold: float, num_perm: int, **kw: object) -> list[int]:
    # the one-pass word-5-gram rule: the ground truth here is that rule's exact Jaccard (the short-row
    # second pass is measured against planted edits in bench_dedup_quality.py)
    kw.setdefault("short_words", 0)
    out = minhash_duplicates(table, field="response", threshold=threshold, num_perm=num_perm, seed=1, **kw)
    pos = {u: i for i, u in enumerate(table["uid"].to_list())}
    return _canon([pos[c] for c in out["cluster_id"].to_list()])


def run_datasketch(docs: list[str], threshold: float, num_perm: int) -> list[int]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    mhs = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in shingle_strings(d, ngram=NGRAM)])
        lsh.insert(str(i), m)
        mhs.append(m)
    parent = list(range(len(docs)))
    for i, m in enumerate(mhs):
        for key in lsh.query(m):
            if int(key) != i:
                parent[_find(parent, i)] = _find(parent, int(key))
    return _canon([_find(parent, i) for i in range(len(docs))])


def run_datatrove(docs: list[str], bands: int, rows: int, workdir: Path) -> list[int]:
    import logging
    import struct

    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer
    from loguru import logger

    logger.remove()
    logging.disable(logging.WARNING)

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split(" ")

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            raise NotImplementedError

    off = TextNormConfig(lowercase=False, norm_whitespace=False, remove_punctuation=False,
                         norm_unicode_diacritics=False, norm_numbers=False)
    cfg = MinhashConfig(n_grams=NGRAM, num_buckets=bands, hashes_per_bucket=rows, seed=1, norm_config=off)
    documents = [Document(text=d, id=str(i)) for i, d in enumerate(docs)]
    sig, buckets, clusters = workdir / "sigs", workdir / "buckets", workdir / "clusters"
    LocalPipelineExecutor([documents, MinhashDedupSignature(output_folder=str(sig), config=cfg,
                                                            language=Whitespace())],
                          tasks=1, workers=1, logging_dir=str(workdir / "log1")).run()
    LocalPipelineExecutor([MinhashDedupBuckets(input_folder=str(sig), output_folder=str(buckets), config=cfg)],
                          tasks=bands, workers=1, logging_dir=str(workdir / "log2")).run()
    LocalPipelineExecutor([MinhashDedupCluster(input_folder=str(buckets), output_folder=str(clusters), config=cfg,
                                               save_cluster_id=True)],
                          tasks=1, workers=1, logging_dir=str(workdir / "log3")).run()
    labels = list(range(len(docs)))
    path = clusters / "000000.clusters"
    if path.exists():
        raw = path.read_bytes()
        cid_first: dict[int, int] = {}
        for doc, cid in struct.iter_unpack("<2I", raw):
            labels[doc] = -1 - cid  # temporary label per cluster id
            cid_first[cid] = min(cid_first.get(cid, doc), doc)
        labels = [cid_first[-1 - lab] if lab < 0 else lab for lab in labels]
    return _canon(labels)


def timed(fn, repeat: int):  # noqa: ANN001, ANN201
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 real + 400 planted rows (default 5,000 + 1,000)")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method (best is reported)")
    ap.add_argument("--no-datatrove", action="store_true")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to results.jsonl")
    args = ap.parse_args()
    n_base, n_dups = (2000, 400) if args.quick else (5000, 1000)
    docs = pool(n_base, n_dups)
    t, num_perm = args.threshold, args.num_perm
    table = as_table(docs)
    truth, n_edges = exact_labels(docs, t)
    truth_pairs, truth_rows = pairs_of(truth), dup_rows(truth)
    balanced, recall = lsh_params(t, num_perm), recall_bands(t, num_perm)
    params = {"n_docs": len(docs), "n_base": n_base, "n_planted": n_dups, "threshold": t, "num_perm": num_perm,
              "shingles": f"word {NGRAM}-grams of normalised tokens", "quick": args.quick, "repeat": args.repeat,
              "truth_edges": n_edges, "truth_pairs": len(truth_pairs), "truth_dup_rows": len(truth_rows)}

    methods = {
        "curate": (lambda: run_curate(table, t, num_perm), {"verify": "exact", "bands_rows": list(recall)}),
        "curate_signature_verify": (lambda: run_curate(table, t, num_perm, verify="signature", bands=balanced[0],
                                                       rows=balanced[1]),
                                    {"verify": "signature", "bands_rows": list(balanced)}),
        "datasketch": (lambda: run_datasketch(docs, t, num_perm), {"bands_rows": list(balanced)}),
    }
    if not args.no_datatrove:
        def dt() -> list[int]:
            with tempfile.TemporaryDirectory() as tmp:
                return run_datatrove(docs, balanced[0], balanced[1], Path(tmp))

        methods["datatrove"] = (dt, {"bands_rows": list(balanced), "stages_timed": "1-3"})
    results = {}
    for name, (fn, extra) in methods.items():
        fn()  # warm-up (imports, caches)
        seconds, labels = timed(fn, args.repeat)
        results[name] = {"seconds": round(seconds, 4), "docs_per_s": round(len(docs) / seconds, 1),
                         "pair": f1(pairs_of(labels), truth_pairs), "row": f1(dup_rows(labels), truth_rows), **extra}
    ref = "datatrove" if "datatrove" in results else "datasketch"
    for name, res in results.items():
        res["speedup_vs_" + ref] = round(results[ref]["seconds"] / res["seconds"], 2)
        if args.no_record:
            continue
        record(f"minhash/{name}", {**params, "method": name},
               {"docs_per_s": res["docs_per_s"], "seconds": res["seconds"], "pair_f1": res["pair"]["f1"],
                "pair_precision": res["pair"]["precision"], "pair_recall": res["pair"]["recall"],
                "row_f1": res["row"]["f1"], "row_precision": res["row"]["precision"],
                "row_recall": res["row"]["recall"], f"speedup_vs_{ref}": res["speedup_vs_" + ref],
                **{k: v for k, v in res.items() if k in ("bands_rows", "verify", "stages_timed")}})
    for name, res in results.items():
        print(f"{name:26s} {res['docs_per_s']:>9.1f} docs/s  pair F1 {res['pair']['f1']:.4f}  "
              f"row F1 {res['row']['f1']:.4f}  x{res['speedup_vs_' + ref]} vs {ref}")


if __name__ == "__main__":
    main()
