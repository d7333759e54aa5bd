"""Near-duplicate quality on planted pools: curate's MinHash default vs datatrove and datasketch.

Pool (built per size from real rows in ``../shared/data``; seeded, no tuning per method):

- **Distinct real rows** (the base): Alpaca 5k, LLaMA-Factory's alpaca_en_demo, CodeAlpaca (2k and
  new), GSM8K train, MMLU test (question + choices → answer), AlpacaEval instructions with GPT-4
  outputs, and LLaMA-Factory ``identity.json`` templates. Rows whose prompt+response is within
  word-3-gram Jaccard 0.4 of an earlier row are dropped first (exact, by prefix filtering), so the
  base holds no natural near-duplicates whose truth would be ambiguous.
- **Planted duplicates** (families: a base row and its edited copies; copies are edited from the
  base independently, so copies of one row are duplicates of each other too), one edit kind per copy:
  ``sub`` / ``ins`` / ``del`` (one word per hundred, at least one: substitute, insert or delete a
  real word), ``punct_case`` (case flips and punctuation added or dropped, one per fifty words, at
  least one), ``template`` (identity rows with ``{{name}}`` / ``{{author}}`` filled with other
  names; the base is the first fill).
- **Hard negatives**: ``shuffled`` (a base row with its prompt words and its response words
  shuffled: same words, not the same text), ``same_prompt`` (AlpacaEval instructions answered by
  alpaca-7b or text-davinci-003: the same prompt as a base row with a different real response;
  kept only where the response's word-set Jaccard to the base response is below 0.5, and one per
  instruction, since alpaca-7b, trained on text-davinci-003 outputs, often repeats them).

Truth: a row's family. Metrics per method, on the same pool in the same run:

- row P/R/F1: rows marked duplicate (all but the earliest row of a predicted cluster) against the
  planted copies (the issue's measure); pair P/R/F1: pairs placed in one cluster against pairs of
  one family (counted per cluster×family, so large false clusters cost quadratically);
- recall per edit kind and for short (≤ 64 words) / long rows, merge rate per negative kind (a
  ``base`` row is merged when its cluster holds a row of another family);
- ``exact_pair_f1`` / ``exact_row_f1``: against components of the exact rule the method
  approximates (curate: its own two-pass rule; others: word-5-gram Jaccard ≥ 0.8 of curate's
  normalised tokens), found exhaustively by prefix filtering (Bayardo et al., 2007, "Scaling up
  all pairs similarity search");
- ``docs_per_s`` (pool rows / wall seconds of the dedup call, inputs already in memory) and
  ``peak_rss_mb`` (the method's own process: every method runs in a fresh subprocess).

Methods: ``curate`` (``minhash_duplicates`` defaults on prompt+response), ``curate_word5`` (the
previous default: the short-row pass off), ``datasketch`` (``MinHash`` + ``MinHashLSH`` at 0.8,
word 5-grams of lower-cased whitespace tokens, union-find), ``datatrove`` (its MinHash stages 1-3
with its defaults: 14 × 8 buckets, word 5-grams, its normalisation and English tokenizer,
``workers=1``; run with ``/work/venvs/datatrove/bin/python`` through ``_datatrove_minhash.py``,
skipped with a note when that venv is missing; stage 4, writing the kept documents, is not timed).

    nice -n 15 .venv/bin/python benchmarks/bench_dedup_quality.py --sizes 10000 50000
    nice -n 15 .venv/bin/python benchmarks/bench_dedup_quality.py --sizes 200000 --methods curate datatrove
Appends one line per (size, method) to benchmarks/results.jsonl through ``_common.record``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, record  # noqa: E402

from curate.curation._common import word_tokens  # noqa: E402
from curate.schema import dedupe_uids, make_record, message, texts, to_frame  # noqa: E402

DATATROVE_PY = Path("/work/venvs/datatrove/bin/python")
SHORT_WORDS = 64
NAMES = ["Ava", "Orion", "Nova", "Sage", "Atlas", "Iris", "Echo", "Lumen", "Vega", "Juniper", "Kai", "Mira"]
AUTHORS = ["Acme Labs", "Northwind", "Globex AI", "Initech", "Umbrella Research", "Hooli", "Stark Industries",
           "Wayne Tech", "Cyberdyne", "Tyrell Corp", "Soylent", "Aperture Science"]
EDIT_KINDS = ("sub", "ins", "del", "punct_case")
_SPLIT = re.compile(r"(\s+)")


# ------------------------------------------------------------------------------ real rows
def _load_json(rel: str) -> list[dict]:
    return json.loads((DATA / rel).read_text(encoding="utf-8"))


def _alpaca(rows: list[dict], out_key: str = "output") -> list[tuple[str, str]]:
    return [((r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")).strip(), str(r[out_key]).strip())
            for r in rows]


def real_rows() -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """(base candidates, identity templates, same-prompt alternatives keyed by instruction)."""
    rows = _alpaca(_load_json("alpaca/alpaca_5000.json")) + _alpaca(_load_json("llama-factory/alpaca_en_demo.json"))
    rows += _alpaca(_load_json("codealpaca/code_alpaca_2k.json")) + _alpaca(_load_json("codealpaca/new_codealpaca.json"))
    for line in (DATA / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rows.append((r["question"], r["answer"]))
    for f in sorted((DATA / "mmlu" / "test").glob("*.csv")):
        with open(f, encoding="utf-8", newline="") as fh:
            for q, a, b, c, d, ans in csv.reader(fh):
                rows.append((f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}", f"Answer: {ans}"))
    gpt4 = _load_json("alpaca_eval/gpt4__model_outputs.json")
    rows += [(r["instruction"], r["output"]) for r in gpt4]
    alts = [(r["instruction"], r["output"]) for name in ("alpaca-7b", "text_davinci_003")
            for r in _load_json(f"alpaca_eval/{name}__model_outputs.json")]
    identity = _alpaca(_load_json("llama-factory/identity.json"))
    rows = [(p, r) for p, r in rows if p.strip() and r.strip()]
    return rows, identity, alts


def fill(template: str, k: int) -> str:
    return template.replace("{{name}}", NAMES[k % len(NAMES)]).replace("{{author}}", AUTHORS[(k * 5 + 1) % len(AUTHORS)])


# ------------------------------------------------------------------ exact similarity joins
def exact_pairs(sets: list[frozenset[int]], threshold: float, rows: np.ndarray | None = None) -> list[tuple[int, int]]:
    """All pairs ``(i, j)`` with exact Jaccard ≥ ``threshold`` (prefix filtering, then verification).

    Each set is ordered rarest token first; two sets with Jaccard ≥ t share a token among the first
    ``|x| - ceil(t|x|) + 1`` of each (Bayardo et al., 2007), and ``|y| ≥ t|x|``. Exhaustive.
    """
    idx = list(range(len(sets))) if rows is None else [int(i) for i in rows]
    freq = Counter(tok for i in idx for tok in sets[i])
    index: dict[int, list[int]] = defaultdict(list)
    out = []
    for i in sorted(idx, key=lambda i: (len(sets[i]), i)):
        s = sets[i]
        if not s:
            continue
        toks = sorted(s, key=lambda t: (freq[t], t))
        prefix = toks[: len(s) - math.ceil(threshold * len(s) - 1e-9) + 1]
        cand = {j for t in prefix for j in index[t]}
        for j in cand:
            o = sets[j]
            if len(o) >= threshold * len(s) - 1e-9:
                inter = len(s & o)
                if inter >= threshold * (len(s) + len(o) - inter) - 1e-9:
                    out.append((min(i, j), max(i, j)))
        for t in prefix:
            index[t].append(i)
    return out


class Vocab:
    """Shingle strings → ints (so sets are small and comparisons fast)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, items: set[str]) -> frozenset[int]:
        ids = self.ids
        return frozenset(ids.setdefault(x, len(ids)) for x in items)


def word_ngrams(toks: list[str], n: int) -> set[str]:
    n = min(n, len(toks))
    return {" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)} if toks else set()


def components(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Component label of each row = its smallest member index."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(n)])
    first: dict[int, int] = {}
    for i, r in enumerate(roots.tolist()):
        first.setdefault(r, i)
    return np.array([first[r] for r in roots.tolist()])


def distinct_base(cands: list[tuple[str, str]], threshold: float = 0.4) -> list[int]:
    """Indices of base candidates with no other candidate before them at word-3-gram Jaccard ≥
    ``threshold`` (a measure neither compared method uses, set well below their thresholds)."""
    vocab = Vocab()
    sets = [vocab(word_ngrams(word_tokens(p + "\n\n" + r), 3)) for p, r in cands]
    drop = {j for i, j in exact_pairs(sets, threshold)}  # j > i: the later row of every close pair goes
    return [i for i in range(len(cands)) if i not in drop]


# ------------------------------------------------------------------------------- planted edits
def _word_slots(parts: list[str]) -> list[int]:
    return [k for k, t in enumerate(parts) if t and not t.isspace()]


def edit_text(prompt: str, response: str, kind: str, rng: random.Random, vocab: list[str]) -> tuple[str, str]:
    """Apply one kind of planted edit at random word positions of prompt + response."""
    fields = [_SPLIT.split(prompt), _SPLIT.split(response)]
    slots = [(f, k) for f in (0, 1) for k in _word_slots(fields[f])]
    n_words = len(slots)
    if kind == "del" and n_words < 2:
        kind = "sub"
    n_edits = max(1, n_words // 50) if kind == "punct_case" else max(1, round(n_words / 100))
    for _ in range(n_edits):
        f, k = rng.choice([(f, k) for f in (0, 1) for k in _word_slots(fields[f])])
        w = fields[f][k]
        if kind == "sub":
            fields[f][k] = rng.choice(vocab)
        elif kind == "ins":
            fields[f][k] = rng.choice(vocab) + " " + w
        elif kind == "del":
            fields[f][k] = ""
        else:  # punctuation and case
            op = rng.randrange(3)
            if op == 0:
                fields[f][k] = w.upper() if w.islower() else w.lower()
            elif op == 1:
                fields[f][k] = w + rng.choice(",.!;:")
            else:
                fields[f][k] = w.rstrip(",.!?;:") or w + "?"
    return "".join(fields[0]).strip() or prompt, "".join(fields[1]).strip() or response


def shuffle_text(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(5):  # a real shuffle: a row of repeated words may need more than one try
        rng.shuffle(words)
        if " ".join(words) != " ".join(text.split()) or len(set(words)) < 2:
            break
    return " ".join(words)


def build_pool(n: int, base_rows: list[tuple[str, str]], identity: list[tuple[str, str]],
               alts: list[tuple[str, str]], seed: int = 0) -> dict:
    """A planted pool of ``n`` rows: base rows first (the earliest row of each family), then the
    planted copies and negatives in random order. Returns rows, family ids and kinds."""
    rng = random.Random(seed)
    n_shuffled = n // 10
    base_by_prompt = {p: r for p, r in base_rows}
    same, seen = [], set()
    for p, r in alts:
        own = base_by_prompt.get(p)
        if own is not None and p not in seen:  # one per instruction: alpaca-7b often repeats davinci
            a, b = set(word_tokens(r)), set(word_tokens(own))
            if len(a | b) and len(a & b) / len(a | b) < 0.5:
                same.append((p, r))
                seen.add(p)
    rng.shuffle(same)
    same = same[: n // 30]
    n_template_fam = len(identity)
    n_template_copies = max(n_template_fam, n // 100)
    n_base = min(len(base_rows), n // 2)
    n_copies = n - n_base - n_template_fam - n_template_copies - n_shuffled - len(same)
    order = rng.sample(range(len(base_rows)), n_base)
    base = [base_rows[i] for i in order]
    vocab = sorted({w for p, r in base[:2000] for w in (p + " " + r).split() if w.isalpha() and len(w) > 2})
    rows, family, kind = [], [], []
    for fam, (p, r) in enumerate(base):
        rows.append((p, r)), family.append(fam), kind.append("base")
    for t, (p, r) in enumerate(identity):  # template families: the first fill is the base row
        rows.append((fill(p, 0), fill(r, 0))), family.append(n_base + t), kind.append("base")
    planted = []
    fam_rows = rng.sample(range(n_base), min(n_base, max(1, n_copies // 2)))
    for c in range(n_copies):
        fam = fam_rows[c % len(fam_rows)]
        k = EDIT_KINDS[rng.randrange(len(EDIT_KINDS))]
        planted.append((*edit_text(*base[fam], k, rng, vocab), fam, k))
    for c in range(n_template_copies):
        t = c % n_template_fam
        p, r = identity[t]
        planted.append((fill(p, 1 + c // n_template_fam), fill(r, 1 + c // n_template_fam), n_base + t, "template"))
    next_fam = n_base + n_template_fam
    for c in range(n_shuffled):
        p, r = base[rng.randrange(n_base)]
        planted.append((shuffle_text(p, rng), shuffle_text(r, rng), next_fam + c, "shuffled"))
    next_fam += n_shuffled
    for c, (p, r) in enumerate(same):
        planted.append((p, r, next_fam + c, "same_prompt"))
    rng.shuffle(planted)
    for p, r, fam, k in planted:
        rows.append((p, r)), family.append(fam), kind.append(k)
    return {"rows": rows, "family": np.array(family), "kind": np.array(kind)}


def as_table(rows: list[tuple[str, str]]) -> pl.DataFrame:
    records = [make_record("sft", messages=[message("user", p), message("assistant", r)]) for p, r in rows]
    dedupe_uids(records)
    # Keep rule = earliest row: uids are content hashes, so pool order goes in as source lines.
    return to_frame(records).with_columns(source=pl.lit("pool"), source_line=np.arange(len(rows)))


# ------------------------------------------------------------------------------------ metrics
def _pairs_within(*keys: np.ndarray) -> int:
    """Number of unordered row pairs that agree on every key array."""
    _, counts = np.unique(np.stack(keys, axis=1), axis=0, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _prf(tp: int, pred: int, truth: int) -> dict[str, float]:
    p = tp / pred if pred else 1.0
    r = tp / truth if truth else 1.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 4)}


def _dup_rows(labels: np.ndarray) -> np.ndarray:
    """Rows that are not the earliest row of their cluster (labels are any cluster ids)."""
    first: dict[int, int] = {}
    for i, lab in enumerate(labels.tolist()):
        first.setdefault(lab, i)
    return np.array([first[lab] != i for i, lab in enumerate(labels.tolist())])


def scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """Pair and row precision / recall / F1 of predicted cluster ``labels`` against ``truth`` ids."""
    pred_dup, true_dup = _dup_rows(labels), _dup_rows(truth)
    return {"pair": _prf(_pairs_within(labels, truth), _pairs_within(labels), _pairs_within(truth)),
            "row": _prf(int((pred_dup & true_dup).sum()), int(pred_dup.sum()), int(true_dup.sum()))}


def breakdown(labels: np.ndarray, pool: dict, n_words: np.ndarray) -> dict[str, float]:
    """Recall per edit kind and row length, merge rate per negative kind."""
    fam, kind = pool["family"], pool["kind"]
    base_of = {int(f): i for i, (f, k) in enumerate(zip(fam.tolist(), kind.tolist())) if k == "base"}
    found = np.array([labels[i] == labels[base_of[int(f)]] if int(f) in base_of and k != "base" else False
                      for i, (f, k) in enumerate(zip(fam.tolist(), kind.tolist()))])
    out: dict[str, float] = {}
    copies = np.isin(kind, [*EDIT_KINDS, "template"])
    for k in (*EDIT_KINDS, "template"):
        m = kind == k
        if m.any():
            out[f"recall_{k}"] = round(float(found[m].mean()), 4)
    for name, m in (("short", copies & (n_words <= SHORT_WORDS)), ("long", copies & (n_words > SHORT_WORDS))):
        if m.any():
            out[f"recall_{name}"] = round(float(found[m].mean()), 4)
    size = Counter(labels.tolist())
    families_in = defaultdict(set)
    for lab, f in zip(labels.tolist(), fam.tolist()):
        families_in[lab].add(f)
    for k in ("shuffled", "same_prompt"):
        m = kind == k
        if m.any():
            out[f"merged_{k}"] = round(float(np.mean([size[labels[i]] > 1 for i in np.nonzero(m)[0]])), 4)
    m = np.nonzero(kind == "base")[0]
    out["merged_base"] = round(float(np.mean([len(families_in[labels[i]]) > 1 for i in m])), 4)
    return out


def exact_references(rows: list[tuple[str, str]], short_ngram: int, short_threshold: float,
                     short_edits: int | None) -> dict[str, np.ndarray]:
    """Exact cluster labels: word-5-gram Jaccard ≥ 0.8, and curate's two-pass rule."""
    toks = [word_tokens(p + "\n\n" + r) for p, r in rows]
    vocab = Vocab()
    w5 = exact_pairs([vocab(word_ngrams(t, 5)) for t in toks], 0.8)
    short = np.array([i for i, t in enumerate(toks) if 0 < len(t) <= SHORT_WORDS])
    sets2 = [vocab(word_ngrams(t, short_ngram)) if len(t) <= SHORT_WORDS else frozenset() for t in toks]
    w2 = exact_pairs(sets2, short_threshold, short)
    if short_edits is not None:
        w2 = [(i, j) for i, j in w2 if len(sets2[i] ^ sets2[j]) <= 2 * short_ngram * short_edits]
    return {"word5": components(len(rows), w5), "curate": components(len(rows), w5 + w2)}


# ------------------------------------------------------------------------------------ methods
def _rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it does not carry over the
    parent's peak across fork + exec), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(method: str, folder: Path) -> None:
    """Run one method on the pool in ``folder`` (a fresh process: its peak memory is its own)."""
    if method.startswith("curate"):
        from curate.curation.minhash import minhash_duplicates, permutations

        permutations(128, 1)  # imports datasketch (about 2 s): import time is not dedup throughput
        table = pl.read_parquet(folder / "pool.parquet")
        base = _rss_mb()
        kw = {"short_words": 0} if method == "curate_word5" else {}
        t0 = time.perf_counter()
        out = minhash_duplicates(table, field="prompt+response", seed=1, **kw)
        seconds = time.perf_counter() - t0
        pos = {u: i for i, u in enumerate(table["uid"].to_list())}
        labels = [pos[c] for c in out["cluster_id"].to_list()]
    else:
        from datasketch import MinHash, MinHashLSH

        docs = [json.loads(line) for line in (folder / "pool.jsonl").read_text(encoding="utf-8").splitlines()]
        base = _rss_mb()
        t0 = time.perf_counter()
        lsh = MinHashLSH(threshold=0.8, num_perm=128)
        mhs = []
        for i, d in enumerate(docs):
            m = MinHash(num_perm=128, seed=1)
            w = d.lower().split()
            m.update_batch([" ".join(w[k : k + 5]).encode("utf-8") for k in range(max(1, len(w) - 4))])
            lsh.insert(i, m)
            mhs.append(m)
        parent = list(range(len(docs)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, m in enumerate(mhs):
            for j in lsh.query(m):
                parent[find(i)] = find(j)
        labels = [find(i) for i in range(len(docs))]
        seconds = time.perf_counter() - t0
    (folder / f"{method}.json").write_text(json.dumps({"labels": labels, "seconds": seconds,
                                                       "peak_rss_mb": _rss_mb(), "base_rss_mb": base}))


def run_method(method: str, folder: Path) -> dict | None:
    if method == "datatrove":
        if not DATATROVE_PY.exists():
            print(f"datatrove skipped: {DATATROVE_PY} not found (python3 -m venv /work/venvs/datatrove && "
                  "/work/venvs/datatrove/bin/pip install datatrove spacy regex tokenizers 'xxhash<4')")
            return None
        cmd = [str(DATATROVE_PY), str(Path(__file__).with_name("_datatrove_minhash.py")), str(folder / "pool.jsonl"),
               str(folder / "datatrove.json")]
    else:
        cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder)]
    with open(folder / f"{method}.log", "w") as log:  # datatrove logs every stage: keep it out of the table
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "0"})
    if done.returncode:
        raise RuntimeError(f"{method} failed:\n" + (folder / f"{method}.log").read_text()[-3000:])
    return json.loads((folder / f"{method}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["curate", "curate_word5", "datasketch", "datatrove"])
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-Jaccard references (slow at 2e5)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to results.jsonl")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.folder))
        return
    from curate.curation.minhash import SHORT_EDITS, SHORT_NGRAM, SHORT_THRESHOLD
    from curate.curation.minhash import SHORT_WORDS as DEFAULT_SHORT

    assert DEFAULT_SHORT == SHORT_WORDS, "length buckets of the report follow curate's default"
    t0 = time.perf_counter()
    cands, identity, alts = real_rows()
    keep = distinct_base(cands + [(fill(p, 0), fill(r, 0)) for p, r in identity])
    base_rows = [cands[i] for i in keep if i < len(cands)]
    ident = [identity[i - len(cands)] for i in keep if i >= len(cands)]
    print(f"base: {len(base_rows)} distinct real rows of {len(cands)}, {len(ident)} of {len(identity)} identity "
          f"templates ({time.perf_counter() - t0:.0f} s)")
    for n in args.sizes:
        pool = build_pool(n, base_rows, ident, alts, seed=args.seed)
        table = as_table(pool["rows"])
        docs = texts(table, "prompt+response")
        n_words = np.array([len(word_tokens(d)) for d in docs])
        truth = pool["family"]
        refs = {} if args.no_exact else exact_references(pool["rows"], SHORT_NGRAM, SHORT_THRESHOLD, SHORT_EDITS)
        params = {"n_rows": len(docs), "seed": args.seed, "field": "prompt+response",
                  "kinds": dict(sorted(Counter(pool["kind"].tolist()).items())),
                  "truth_dup_rows": int(_dup_rows(truth).sum()),
                  "short_rows": int((n_words <= SHORT_WORDS).sum())}
        print(f"\n== {len(docs)} rows: {params['kinds']}")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            table.write_parquet(folder / "pool.parquet")
            (folder / "pool.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
            for method in args.methods:
                res = run_method(method, folder)
                if res is None:
                    continue
                labels = np.asarray(res["labels"])
                sc = scores(labels, truth)
                metrics = {"docs_per_s": round(len(docs) / res["seconds"], 1), "seconds": round(res["seconds"], 2),
                           **({"version": res["version"]} if "version" in res else {}),
                           "peak_rss_mb": res["peak_rss_mb"], "base_rss_mb": res["base_rss_mb"],
                           "row_f1": sc["row"]["f1"], "row_precision": sc["row"]["precision"],
                           "row_recall": sc["row"]["recall"], "pair_f1": sc["pair"]["f1"],
                           "pair_precision": sc["pair"]["precision"], "pair_recall": sc["pair"]["recall"],
                           **breakdown(labels, pool, n_words)}
                if refs:
                    ref = refs["curate" if method == "curate" else "word5"]
                    ex = scores(labels, ref)
                    metrics.update(exact_rule="curate two-pass" if method == "curate" else "word5 >= 0.8",
                                   exact_pair_f1=ex["pair"]["f1"], exact_row_f1=ex["row"]["f1"])
                line = ", ".join(f"{k} {v}" for k, v in metrics.items() if k not in ("base_rss_mb",))
                print(f"{method:13s} {line}", flush=True)
                if not args.no_record:
                    record(f"dedup_quality/{method}", {**params, "method": method}, metrics)
                    sys.stdout.flush()


if __name__ == "__main__":
    main()
