"""Targeted selection: do curate's selectors find the rows that help a target task, and does it show?

The pool holds the answer. It mixes generic instruction data from ../shared/data (Alpaca,
CodeAlpaca, LLaMA-Factory demos, self-instruct seed tasks, OASST1 best replies) with in-domain rows
of GSM8K (train split), MMLU (test split) and BBH, with their reference answers, each task at most
5% of the pool. Targets are *other* rows of those tasks (GSM8K test, MMLU val, BBH rows not in the
pool): a small selection half that selectors see and an evaluation half that never enters the
pool (checked with curate's 13-gram decontamination index; exact prompt matches are removed, and
shared 13-grams, which BBH's task templates produce, are counted and reported).

Part 1, in-domain precision and recall at a 5% budget, for every selector, two settings:
- single task: targets = one task's selection rows; precision = share of picks from that task;
- all tasks: targets = the three tasks together (round-robin where the selector has it).
Selectors: random, ``rds`` (RDS+, Ivison et al. 2025) on MiniLM embeddings and on SmolLM2 hidden
states, ``tarot``, ``dsir`` (default and ``smoothing=reference``), ``kcenter``, LESS / BIDS on
warm-up Adam gradient features (``--grads``), Quad (``--quad``), and the three-line baseline a user
would try first: max cosine of MiniLM embeddings to any target row.

Part 2, downstream: LoRA SFT of SmolLM2-135M-Instruct on each 5% subset of the all-tasks setting
(benchmarks/_sft.py), then the held-out reference-answer loss per task on the evaluation half;
paired differences against random with 95% intervals over seeds and over examples; the in-domain
rows themselves ("oracle", a seeded balanced draw of the pool's in-domain rows) and random are the
bounds. Finished trainings are cached in the workdir, so a stopped run resumes.

    python benchmarks/targeted_selection.py --quick            # < 30 min on 2 cores
    python benchmarks/targeted_selection.py                    # 3,000-row pool, 3 seeds (hours)
    python benchmarks/targeted_selection.py --train random oracle rds rds_lm tarot --seeds 0 1 2
    python benchmarks/targeted_selection.py --methods dsir --train random dsir@mmlu   # one task's targets
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, HERE, peak_rss_mb, record  # noqa: E402
from _sft import RunCache, TrainConfig, encode, example_losses, paired_interval, train_eval  # noqa: E402

TASKS = ("bbh", "gsm8k", "mmlu")
LETTERS = "ABCD"
# generic sources and their share of the generic part of the pool
GENERIC = (
    ("alpaca/alpaca_5000.json", 0.49), ("codealpaca/code_alpaca_2k.json", 0.22),
    ("llama-factory/alpaca_en_demo.json", 0.12), ("llama-factory/v1_sft_demo.jsonl", 0.08),
    ("self-instruct/seed_tasks.jsonl", 0.05), ("oasst1_openassistant/en_100_tree.jsonl", 0.04),
)
SELECTION_METHODS = ("random", "cosine_max", "rds", "rds_mean", "rds_lm", "rds_lm_mean", "tarot", "tarot_whiten",
                     "dsir", "dsir_reference", "kcenter", "less", "bids", "quad")


# ----------------------------------------------------------------------------- data
def _read(path: str) -> pl.DataFrame:
    import curate

    return curate.read_sources([str(DATA / path)]).table


def _answer(row: dict[str, Any]) -> str | None:
    """Reference answer as the assistant's reply (MMLU: 'C. <choice text>')."""
    ans = (row.get("answer") or "").strip()
    if not ans:
        return None
    if row["task"].startswith("mmlu"):
        choices = json.loads(row["meta"] or "{}").get("choices") or []
        i = LETTERS.find(ans[:1])
        return f"{ans[:1]}. {choices[i].strip()}" if 0 <= i < len(choices) else ans
    return ans


def _as_rows(table: pl.DataFrame, kind: str, task: str) -> list[dict[str, Any]]:
    """Target-shaped rows → canonical ``sft`` (pool) or ``target`` records with the answer as reply."""
    from curate.schema import make_record

    out = []
    for r in table.iter_rows(named=True):
        ans = _answer(r)
        if not ans:
            continue
        msgs = [{"role": "user", "content": r["messages"][0]["content"]}, {"role": "assistant", "content": ans}]
        out.append(make_record(kind, messages=msgs, task=task if kind == "target" else None,
                               answer=ans if kind == "target" else None, source=f"{task}"))
    return out


def _generic(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    from curate.schema import make_record

    out: list[dict[str, Any]] = []
    spare: list[dict[str, Any]] = []
    for path, share in GENERIC:
        t = _read(path)
        if "preference" in t["kind"].unique().to_list():  # OASST1 trees: the best reply per prompt as SFT
            rows, seen = [], set()
            for r in t.sort("uid").iter_rows(named=True):
                key = r["prompt"][-1]["content"]
                if key not in seen and r["chosen"]:
                    seen.add(key)
                    rows.append(make_record("sft", messages=[*r["prompt"], *r["chosen"]], source=path.split("/")[0]))
        else:
            rows = [{**r, "source": path.split("/")[0]} for r in t.filter(pl.col("kind") == "sft").sort("uid").to_dicts()
                    if any(m["role"] == "assistant" and m["content"].strip() for m in r["messages"])]
        perm = rng.permutation(len(rows))
        take = min(len(rows), int(round(share * n)))
        out += [rows[i] for i in np.sort(perm[:take])]
        spare += [rows[i] for i in perm[take:]]
    # duplicates across sources and small sources leave the pool short: top up from the spare rows
    seen = {r["uid"] for r in out}
    for r in spare:
        if len(seen) >= n:
            break
        if r["uid"] not in seen:
            seen.add(r["uid"])
            out.append(r)
    return out


def build_data(n_pool: int, n_sel: int, n_eval: int, seed: int = 0) -> dict[str, Any]:
    """Pool (with a ``domain`` column), selection targets and evaluation targets, reproducibly."""
    from curate.curation.decontam import NgramIndex, ngram_contamination
    from curate.schema import to_frame

    rng = np.random.default_rng(seed)
    per_task = int(0.05 * n_pool)
    sources = {"gsm8k": (_read("gsm8k/train.jsonl"), _read("gsm8k/test.jsonl")),
               "mmlu": (_read("mmlu/test"), _read("mmlu/val"))}
    bbh = _read("bbh/bbh").sort("uid")
    perm = rng.permutation(bbh.height)
    sources["bbh"] = (bbh[perm[n_sel + n_eval :].tolist()], bbh[perm[: n_sel + n_eval].tolist()])
    pool_rows: list[dict[str, Any]] = []
    sel_rows: list[dict[str, Any]] = []
    eval_rows: list[dict[str, Any]] = []
    for task in TASKS:
        pool_src, tgt_src = (s.sort("uid") for s in sources[task])
        in_dom = _as_rows(pool_src, "sft", task)
        pool_rows += [in_dom[i] for i in np.sort(rng.choice(len(in_dom), per_task, replace=False))]
        tgt = _as_rows(tgt_src, "target", task)
        pick = rng.permutation(len(tgt))[: n_sel + n_eval]
        sel_rows += [tgt[i] for i in pick[:n_sel]]
        eval_rows += [tgt[i] for i in pick[n_sel:]]
    pool_rows += _generic(n_pool - len(pool_rows), rng)
    pool = to_frame(pool_rows).unique("uid", keep="first", maintain_order=True)
    pool = pool.with_columns(pl.when(pl.col("source").is_in(list(TASKS))).then(pl.col("source"))
                             .otherwise(pl.lit("generic")).alias("domain"))
    sel_t, eval_t = to_frame(sel_rows), to_frame(eval_rows)
    # The evaluation half must never be in the pool: exact prompt matches are removed; shared 13-grams
    # are counted (BBH's task templates repeat long instructions across examples).
    eval_prompts = {m[0]["content"].strip() for m in eval_t["messages"].to_list()}
    exact = pool.filter(pl.col("messages").list.first().struct.field("content").str.strip_chars().is_in(list(eval_prompts)))
    pool = pool.filter(~pl.col("uid").is_in(exact["uid"].to_list()))
    from curate.schema import texts

    index = NgramIndex.build(texts(eval_t, "prompt"), eval_t["uid"].to_list(), ngram=13)
    hits = ngram_contamination(pool, index, fields=("prompt",))
    flagged = pool.select("uid", "domain").join(hits.filter(~pl.col("keep")).select("uid"), on="uid")
    generic_hits = flagged.filter(pl.col("domain") == "generic")["uid"].to_list()
    pool = pool.filter(~pl.col("uid").is_in(generic_hits)).sort("uid")
    decontam = {"exact_prompt_matches_removed": exact.height, "generic_13gram_removed": len(generic_hits),
                "in_domain_13gram_shared": {d: int((flagged["domain"] == d).sum()) for d in TASKS}}
    return {"pool": pool, "sel": sel_t, "eval": eval_t, "decontam": decontam,
            "composition": dict(sorted(pool.group_by("domain").len().iter_rows()))}


# ----------------------------------------------------------------------------- features
def features(data: dict[str, Any], root: Path, need: set[str], args: argparse.Namespace) -> dict[str, Any]:
    """Feature sets (``FeatureStore`` under ``root``) for the pool and the selection targets."""
    from curate.features.embed import embed_table
    from curate.features.store import FeatureSet, FeatureStore

    store = FeatureStore(root)
    times: dict[str, float] = {}
    pool, sel = data["pool"], data["sel"]

    def put_targets(name: str, fs: FeatureSet) -> None:
        store.put(FeatureSet(name, fs.uids, np.asarray(fs.values), dict(fs.meta)))

    if need & {"embed"}:
        t0 = time.perf_counter()
        embed_table(pool, "prompt", store=store)
        put_targets("embed/prompt/targets", embed_table(sel, "prompt"))
        times["minilm_s"] = round(time.perf_counter() - t0, 1)
    if need & {"hidden"}:
        t0 = time.perf_counter()
        embed_table(pool, "prompt", model="lm", store=store, progress=True)
        put_targets("hidden/prompt/targets", embed_table(sel, "prompt", model="lm"))
        times["smollm2_hidden_s"] = round(time.perf_counter() - t0, 1)
    if need & {"grads"}:
        times.update(gradient_features(pool, sel, store, args))
    return {"store": store, "times": times}


def gradient_features(pool: pl.DataFrame, sel: pl.DataFrame, store: Any, args: argparse.Namespace) -> dict[str, float]:
    """LESS as the paper runs it, scaled to a CPU: warm-up LoRA on a random 5% of the pool (LoRA on the
    top ``--lora-layers`` blocks only), a checkpoint per epoch, Adam-preconditioned pool gradients and
    SGD target gradients at each checkpoint, projected to ``--proj-dim``."""
    from curate.pipeline.registry import build_step
    from curate.pipeline.step import StepContext

    if "grad/adam" in store and "grad/sgd/targets" in store:
        return {}
    ctx = StepContext(seed=0, features=store, targets=sel, device="cpu", progress=True)
    t0 = time.perf_counter()
    build_step("warmup", {"fraction": 0.05, "min_rows": 32, "epochs": args.warmup_epochs, "lr": 2e-4,
                          "max_length": 128, "lora_layers": args.lora_layers, "batch_size": 8,
                          "micro_batch_size": 4}).apply(pool, ctx)
    t1 = time.perf_counter()
    build_step("grad_features", {"checkpoints": ["from_step"], "variant": "adam", "proj_dim": args.proj_dim,
                                 "max_length": 128, "batch_size": 8}).apply(pool, ctx)
    return {"warmup_s": round(t1 - t0, 1), "grad_features_s": round(time.perf_counter() - t1, 1)}


# ----------------------------------------------------------------------------- selection
def _cosine_max(pool_x: np.ndarray, tgt_x: np.ndarray, k: int) -> np.ndarray:
    """The three-line baseline: rank pool rows by their max cosine to any target row."""
    sims = (pool_x / np.linalg.norm(pool_x, axis=1, keepdims=True)) @ (tgt_x / np.linalg.norm(tgt_x, axis=1, keepdims=True)).T
    return np.argsort(-sims.max(axis=1), kind="stable")[:k]


def select(method: str, pool: pl.DataFrame, sel: pl.DataFrame, store: Any, k: int, seed: int) -> list[str]:
    """uids picked by ``method`` for the targets ``sel`` (pool sorted by uid)."""
    from curate.selectors import SELECTORS, Budget

    emb = {"feats": "embed/prompt", "target_feats": "embed/prompt/targets"}
    hid = {"feats": "hidden/prompt", "target_feats": "hidden/prompt/targets"}
    grads = {"grads": "grad/adam", "target_grads": "grad/sgd/targets"}
    if method == "cosine_max":
        x = store["embed/prompt"].align(pool["uid"])
        y = store["embed/prompt/targets"].align(sel["uid"])
        return pool["uid"].gather(_cosine_max(x, y, k)).to_list()
    if method == "oracle":
        rng = np.random.default_rng(seed)
        tasks = sorted(set(sel["task"].to_list()))
        out: list[str] = []
        for i, t in enumerate(tasks):
            uids = pool.filter(pl.col("domain") == t)["uid"].to_list()
            share = k // len(tasks) + (1 if i < k % len(tasks) else 0)
            out += [uids[j] for j in rng.permutation(len(uids))[:share]]
        return out
    name, params, roles = {
        "random": ("random", {}, {}),
        "rds": ("rds", {}, emb), "rds_mean": ("rds", {"aggregate": "mean"}, emb),
        "rds_lm": ("rds", {}, hid), "rds_lm_mean": ("rds", {"aggregate": "mean"}, hid),
        "tarot": ("tarot", {}, emb), "tarot_whiten": ("tarot", {"whiten": "full"}, emb),
        "dsir": ("dsir", {"text_field": "prompt", "target_field": "prompt", "top_k": True}, {}),
        "dsir_reference": ("dsir", {"text_field": "prompt", "target_field": "prompt", "top_k": True,
                                    "smoothing": "reference"}, {}),
        "kcenter": ("kcenter", {"metric": "cosine"}, {"embed": "embed/prompt"}),
        "less": ("less", {}, grads), "bids": ("bids", {}, grads),
        "quad": ("quad", {"modules": "mlp", "fit_examples": 200, "max_length": 128, "max_targets": 32},
                 {"embed": "embed/prompt"}),
    }[method]
    feats = {role: store[fname] for role, fname in roles.items()}
    for role in [r for r in feats if r.startswith("target_")]:  # only the targets of this setting
        feats[role] = feats[role].subset(sel["uid"].to_list())
    res = SELECTORS[name](**params).select(pool, feats, Budget(n=k), seed=seed, targets=sel)
    return res.kept_uids


def precision_recall(pool: pl.DataFrame, uids: list[str], tasks: list[str]) -> dict[str, float]:
    dom = dict(zip(pool["uid"].to_list(), pool["domain"].to_list(), strict=True))
    picked = [dom[u] for u in uids]
    hit = sum(d in tasks for d in picked)
    total = int(pool["domain"].is_in(tasks).sum())
    out = {"precision": round(hit / max(len(uids), 1), 3), "recall": round(hit / max(total, 1), 3)}
    if len(tasks) > 1:
        out["by_task"] = {t: picked.count(t) for t in tasks}
    return out


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1,000-row pool, 16/50 targets per task, MiniLM features only, "
                   "1 seed, 2 epochs, 4 subsets fine-tuned")
    p.add_argument("--pool", type=int, default=3000)
    p.add_argument("--n-sel", type=int, default=32, help="selection targets per task")
    p.add_argument("--n-eval", type=int, default=100, help="evaluation targets per task")
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--methods", nargs="+", default=None, help=f"part 1 selectors (default: all but less/bids/quad); "
                   f"known: {', '.join(SELECTION_METHODS)}")
    p.add_argument("--grads", action="store_true", help="also LESS and BIDS (warm-up + gradient features: slow)")
    p.add_argument("--quad", action="store_true", help="also Quad (EK-FAC influence rewards: slow)")
    p.add_argument("--train", nargs="*", default=None, help="part 2 subsets to fine-tune (default: random oracle rds "
                   "rds_lm tarot dsir); METHOD@TASK selects for that task's targets only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lora-layers", type=int, default=4)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--proj-dim", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=str(HERE.parent / "runs" / "targeted_selection"))
    args = p.parse_args(argv)
    if args.quick:
        args.pool, args.n_sel, args.n_eval, args.seeds, args.epochs = 1000, 16, 50, [0], 2
    slow = ("less", "bids", "quad") + (("rds_lm", "rds_lm_mean") if args.quick else ())
    methods = list(args.methods or [m for m in SELECTION_METHODS if m not in slow])
    methods += [m for m in (["less", "bids"] if args.grads else []) + (["quad"] if args.quad else []) if m not in methods]
    train = args.train if args.train is not None else (
        ["random", "oracle", "rds", "tarot"] if args.quick else ["random", "oracle", "rds", "rds_lm", "tarot", "dsir"])
    import torch

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    data = build_data(args.pool, args.n_sel, args.n_eval)
    pool, sel_t, eval_t = data["pool"], data["sel"], data["eval"]
    k = int(args.budget * pool.height)
    need = {"embed"} | ({"hidden"} if any("_lm" in m for m in methods + train) else set())
    need |= {"grads"} if any(m.partition("@")[0] in ("less", "bids") for m in methods + train) else set()
    tag = f"pool{pool.height}_s{args.n_sel}"
    feats = features(data, Path(args.workdir) / "features" / tag, need, args)
    store = feats["store"]
    common = {"quick": args.quick, "pool": pool.height, "composition": data["composition"], "budget_rows": k,
              "n_sel_per_task": args.n_sel, "n_eval_per_task": args.n_eval, "decontam": data["decontam"]}
    print(json.dumps(common), flush=True)

    # Part 1: precision / recall
    picks: dict[tuple[str, str, int], list[str]] = {}
    part1: dict[str, Any] = {}
    for method in methods:
        row: dict[str, Any] = {}
        t0 = time.perf_counter()
        for setting in (*TASKS, "all"):
            tasks = list(TASKS) if setting == "all" else [setting]
            tgt = sel_t.filter(pl.col("task").is_in(tasks))
            uids = select(method, pool, tgt, store, k, 0)
            picks[(method, setting, 0)] = uids
            row[setting] = precision_recall(pool, uids, tasks)
        row["select_s"] = round((time.perf_counter() - t0) / 4, 2)
        part1[method] = row
        print(f"{method:15s} " + " ".join(f"{s}={row[s]['precision']:.2f}" for s in (*TASKS, "all"))
              + f"  ({row['select_s']} s/selection)", flush=True)
        record("targeted_selection/precision", {**common, "method": method},
               {**{s: row[s] for s in (*TASKS, "all")}, "select_s": row["select_s"], "features_s": feats["times"]})

    # Part 2: downstream
    if not train:
        return {"part1": part1}
    from curate.features.lm import load_causal_lm

    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, max_length=args.max_length, lora_layers=args.lora_layers)
    lm, tok = load_causal_lm("default", device="cpu")
    for prm in lm.parameters():
        prm.requires_grad_(False)
    base_state = {kk: v.clone() for kk, v in lm.state_dict().items()}
    pad = int(tok.pad_token_id or 0)
    enc_pool = {e.uid: e for e in encode(pool, tok, cfg.max_length)}
    evals = {t: encode(eval_t.filter(pl.col("task") == t).sort("uid"), tok, cfg.max_length) for t in TASKS}
    eval_uids = [e.uid for t in TASKS for e in evals[t]]
    cache = RunCache(Path(args.workdir) / "runs" / f"{tag}.jsonl")
    base_key = RunCache.key([], -1, cfg, eval_uids)
    base = cache.get(base_key)
    if base is None:
        base = {"loss": {t: float(example_losses(lm, exs, pad).mean()) for t, exs in evals.items()}}
        cache.put(base_key, base)
    outs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in train}
    for seed in args.seeds:  # seed-major: a stopped run leaves every method with the same seeds (±1)
        for method in train:
            # "dsir@mmlu": the subset selected for one task's targets (the whole budget on that task)
            name, _, setting = method.partition("@")
            setting = setting or "all"
            key_pick = (name, setting, 0 if name not in ("random", "oracle") else seed)
            if key_pick not in picks:
                tgt = sel_t if setting == "all" else sel_t.filter(pl.col("task") == setting)
                picks[key_pick] = select(name, pool, tgt, store, k, key_pick[2])
            uids = picks[key_pick]
            key = RunCache.key(uids, seed, cfg, eval_uids)
            out = cache.get(key)
            how = "cached"
            if out is None:
                out = train_eval([enc_pool[u] for u in uids if u in enc_pool], evals, lm, base_state, pad, cfg, seed)
                cache.put(key, out)
                how = f"{out['train_s']:.0f}s train"
            outs[method][seed] = out
            print(f"{method:12s} seed={seed} " + " ".join(f"{t}={out['loss'][t]:.3f}" for t in TASKS)
                  + f" ({how}) [{time.perf_counter() - t_all:.0f}s]", flush=True)
    summary = summarise(outs, base, common, cfg, part1)
    print(f"total {time.perf_counter() - t_all:.0f}s", flush=True)
    return {"part1": part1, "part2": summary}


def summarise(outs: dict[str, dict[int, dict[str, Any]]], base: dict[str, Any], common: dict[str, Any],
              cfg: TrainConfig, part1: dict[str, Any]) -> dict[str, Any]:
    """Mean held-out loss per task and the paired difference to random (same seeds), recorded."""
    rand = outs.get("random", {})
    summary: dict[str, Any] = {}
    for method, by_seed in outs.items():
        seeds = sorted(by_seed)
        metrics: dict[str, Any] = {"untrained": {t: round(base["loss"][t], 4) for t in TASKS}}
        for t in TASKS:
            metrics[f"loss_{t}"] = round(float(np.mean([by_seed[s]["loss"][t] for s in seeds])), 4)
            common_seeds = [s for s in seeds if s in rand]
            if method != "random" and common_seeds:
                metrics[f"vs_random_{t}"] = paired_interval(
                    [np.asarray(by_seed[s]["per_example"][t]) for s in common_seeds],
                    [np.asarray(rand[s]["per_example"][t]) for s in common_seeds])
        name, _, setting = method.partition("@")
        if name in part1:
            metrics[f"precision_{setting or 'all'}"] = part1[name][setting or "all"]["precision"]
        metrics["train_s"] = round(float(np.mean([by_seed[s]["train_s"] for s in seeds])), 1)
        metrics["peak_rss_mb"] = peak_rss_mb()
        record("targeted_selection/downstream", {**common, "method": method, "seeds": seeds, **cfg.__dict__}, metrics)
        summary[method] = metrics
    return summary


if __name__ == "__main__":
    main()
