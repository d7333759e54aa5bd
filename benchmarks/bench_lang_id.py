"""Language identification (the ``lang_id`` step, Lingua) on a labelled multilingual sample.

The sample is built from the TyDi QA files in ../shared/data/tydiqa (14 Wikipedia documents in 11
languages, each with its gold ``language``): every question (short, the hard case: 10-60
characters) and up to ``--passages`` passage candidates per document (cut at ``--max-chars``
characters, passages with fewer than 20 letters skipped), each labelled with its document's
language. Measured for Lingua's high- and low-accuracy modes: accuracy overall, on questions and
on passages, per language, and texts per second (models loaded beforehand; the load is reported
separately).

    python benchmarks/bench_lang_id.py [--quick]
Appends one JSON line per mode to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, peak_rss_mb, record  # noqa: E402

ISO = {"arabic": "ar", "bengali": "bn", "english": "en", "finnish": "fi", "indonesian": "id", "japanese": "ja",
       "korean": "ko", "russian": "ru", "swahili": "sw", "telugu": "te", "thai": "th"}


def sample(passages: int, max_chars: int) -> list[tuple[str, str, str]]:
    """(text, gold ISO code, 'question' | 'passage') from the TyDi QA files."""
    out = []
    files = [(DATA / "tydiqa" / "small_gold_annotation.jsonl", open),
             (DATA / "tydiqa" / "tiny_dev.jsonl.gz", gzip.open)]
    for path, opener in files:
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                lang = ISO[d["language"]]
                out.append((d["question_text"], lang, "question"))
                doc = d["document_plaintext"].encode("utf-8")
                n = 0
                for cand in d["passage_answer_candidates"]:
                    text = doc[cand["plaintext_start_byte"]:cand["plaintext_end_byte"]].decode("utf-8", "ignore")
                    text = " ".join(text.split())[:max_chars]
                    if sum(c.isalpha() for c in text) < 20:
                        continue
                    out.append((text, lang, "passage"))
                    n += 1
                    if n >= passages:
                        break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 passages per document instead of 40")
    ap.add_argument("--passages", type=int, default=None)
    ap.add_argument("--max-chars", type=int, default=300)
    args = ap.parse_args()
    passages = args.passages or (10 if args.quick else 40)
    data = sample(passages, args.max_chars)
    texts = [t for t, _, _ in data]
    gold = [g for _, g, _ in data]
    kinds = [k for _, _, k in data]
    from curate.curation.lang import detector, identify

    for low in (False, True):
        t0 = time.perf_counter()
        det = detector(None, low)
        det.compute_language_confidence_values_in_parallel(["warm up every model once"] * 2)
        for lang in sorted(set(gold)):  # load each gold language's models before timing
            det.compute_language_confidence_values_in_parallel([next(t for t, g in zip(texts, gold) if g == lang)])
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pred, conf = identify(texts, low_accuracy=low, max_chars=args.max_chars)
        secs = time.perf_counter() - t0
        ok = [p == g for p, g in zip(pred, gold)]
        per = defaultdict(list)
        for o, g in zip(ok, gold):
            per[g].append(o)
        by_kind = {k: round(sum(o for o, kk in zip(ok, kinds) if kk == k) / max(1, kinds.count(k)), 4)
                   for k in ("question", "passage")}
        errors = Counter(f"{g}->{p}" for p, g in zip(pred, gold) if p != g).most_common(5)
        record(
            "lang_id/tydiqa",
            {"mode": "low_accuracy" if low else "high_accuracy", "languages": "all 75", "max_chars": args.max_chars,
             "passages_per_doc": passages, "texts": len(texts), "gold_languages": len(set(gold))},
            {"accuracy": round(sum(ok) / len(ok), 4), "accuracy_questions": by_kind["question"],
             "accuracy_passages": by_kind["passage"],
             "per_language": {g: round(sum(v) / len(v), 3) for g, v in sorted(per.items())},
             "texts_per_s": round(len(texts) / secs, 1), "seconds": round(secs, 3), "model_load_s": round(load_s, 2),
             "mean_confidence": round(float(conf.mean()), 4), "top_errors": dict(errors), "peak_rss_mb": peak_rss_mb()},
            notes="TyDi QA questions + passage candidates labelled with the document language; Lingua via curate.",
        )


if __name__ == "__main__":
    main()
