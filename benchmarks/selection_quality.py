"""Selection quality: does a subset chosen by curate fine-tune a better model than a random one?

Issue 11 §3. Pool = Alpaca 5k + CodeAlpaca 2k after a curate recipe (exact + MinHash dedup,
13-gram decontamination against the targets). Targets = GSM8K test, MMLU val, HumanEval with
their reference answers; each task's rows are split in two halves: the *selection* half is what
the selectors aim at (its gradients / embeddings), the *evaluation* half is only used for the
held-out loss. IFEval has no reference answers in ../shared/data, so it cannot give a held-out
answer loss nor a target gradient; it is left out (said in the output).

Selectors (all from curate): random, LESS (Xia et al. 2024, max cosine of projected gradients),
BIDS (Dai et al. 2025, column-normalised iterative selection), TAROT (Feng et al. 2025, optimal
transport on whitened MiniLM embeddings), plus the full pool as a reference and the untrained
model. Features come from the ``embed`` and ``grad_features`` steps.

Each subset fine-tunes SmolLM2-135M-Instruct with LoRA on the last ``--lora-layers`` blocks only
(lower blocks frozen and without adapters, so backward stops there), sequences cut to
``--max-length`` tokens, a fixed number of steps, batch size, learning rate and seed per run.
Reported: mean held-out loss of the reference answers per task and their macro average, and the
per-task mean LESS influence (cosine of gradient features) of each subset ("influence spread").

Deviations from the papers (for a 2-core CPU): gradient features are plain SGD gradients of the
MLP down-projections of the last two transformer blocks of the base model (no warm-up LoRA checkpoints, no Adam
preconditioning), projected to ``--proj-dim``; a few hundred pool rows in --quick.

    python benchmarks/selection_quality.py --quick
    python benchmarks/selection_quality.py --pool 2000 --steps 150 --seeds 0 1 2 --budgets 0.05 0.1
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

TASKS = ("gsm8k", "mmlu", "humaneval")
LETTERS = "ABCD"


# ----------------------------------------------------------------------------- data
def curation_recipe(output: Path) -> dict[str, Any]:
    """The curate recipe that cleans the pool against the targets (dedup + decontam)."""
    return {
        "name": "selection_quality_pool", "seed": 0, "output": str(output),
        "inputs": [str(DATA / "alpaca/alpaca_5000.json"), str(DATA / "codealpaca/code_alpaca_2k.json")],
        "targets": [str(DATA / "gsm8k/test.jsonl"), str(DATA / "mmlu/val"),
                    str(DATA / "human-eval/HumanEval.jsonl.gz"), str(DATA / "ifeval/input_data.jsonl")],
        "steps": [{"use": "exact_dedup", "level": "prompt"}, {"use": "minhash_dedup", "threshold": 0.8},
                  {"use": "decontam"}],
    }


def answer_text(row: dict[str, Any]) -> str | None:
    """The reference answer as an assistant message (MMLU: 'C. <choice text>')."""
    ans = row.get("answer")
    if not ans:
        return None
    if row["task"].startswith("mmlu/"):
        choices = json.loads(row["meta"] or "{}").get("choices") or []
        i = LETTERS.find(ans.strip()[:1])
        return f"{ans.strip()}. {choices[i].strip()}" if 0 <= i < len(choices) else ans
    return ans


def target_halves(targets: pl.DataFrame, per_task: int, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(selection half, evaluation half): ``per_task`` rows per task with answers, split in two."""
    from curate.schema import make_record, to_frame

    rng = np.random.default_rng(seed)
    sel, ev = [], []
    for task in TASKS:
        rows = [r for r in targets.iter_rows(named=True) if r["task"] == task or r["task"].startswith(task + "/")]
        rows = [r for r in rows if answer_text(r)]
        rows.sort(key=lambda r: r["uid"])
        pick = rng.permutation(len(rows))[:per_task]
        recs = [make_record("target", task=task, answer=answer_text(rows[i]),
                            messages=[{"role": "user", "content": rows[i]["messages"][0]["content"]},
                                      {"role": "assistant", "content": answer_text(rows[i])}]) for i in pick]
        half = len(recs) // 2
        sel += recs[:half]
        ev += recs[half:]
    return to_frame(sel), to_frame(ev)


# ----------------------------------------------------------------------------- features + selection
def features(pool: pl.DataFrame, sel_targets: pl.DataFrame, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run the ``embed`` and ``grad_features`` steps; return the feature store."""
    import curate.features.embed  # noqa: F401  (registers the embed step)
    from curate.features.gradients import GradFeaturesStep
    from curate.features.store import FeatureStore
    from curate.pipeline.registry import build_step
    from curate.pipeline.step import StepContext

    store = FeatureStore(root)
    ctx = StepContext(seed=0, features=store, targets=sel_targets, device="cpu")
    t0 = time.perf_counter()
    build_step("embed", {"field": "prompt"}).apply(pool, ctx)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    GradFeaturesStep(params=args.grad_params, proj_dim=args.proj_dim, max_length=args.max_length,
                     batch_size=4, device="cpu").apply(pool, ctx)
    return {"store": store, "embed_s": round(t_embed, 1), "grad_s": round(time.perf_counter() - t0, 1)}


def select(method: str, pool: pl.DataFrame, store: Any, sel_targets: pl.DataFrame, budget: float,
           seed: int) -> tuple[list[str], dict[str, Any]]:
    """uids chosen by ``method`` and the selection's diagnostics."""
    from curate.selectors import SELECTORS, Budget

    roles = {"random": {}, "less": {"grads": "grad/sgd", "target_grads": "grad/sgd/targets"},
             "bids": {"grads": "grad/sgd", "target_grads": "grad/sgd/targets"},
             "tarot": {"feats": "embed/prompt", "target_feats": "embed/prompt/targets"}}[method]
    sel = SELECTORS[method]()
    feats = {role: store.get(name) for role, name in roles.items()}
    res = sel.select(pool, feats, Budget(fraction=budget), seed=seed, targets=sel_targets)
    kept = res.frame.filter(pl.col("keep")).sort("rank")["uid"].to_list()
    return kept, res.diagnostics


def influence_by_task(store: Any, uids: list[str], sel_targets: pl.DataFrame) -> dict[str, float]:
    """Mean cosine of the subset's gradient features with each task's target gradients (LESS matrix)."""
    g = store.get("grad/sgd").align(pl.Series(uids)) if uids else None
    tg = store.get("grad/sgd/targets")
    tgv = tg.align(sel_targets["uid"])
    a = np.asarray(g, dtype=np.float64) @ np.asarray(tgv, dtype=np.float64).T
    tasks = np.array(sel_targets["task"].to_list())
    return {t: round(float(a[:, tasks == t].mean()), 5) for t in TASKS}


# ----------------------------------------------------------------------------- training + eval
def encode(table: pl.DataFrame, tok: Any, max_length: int) -> list[Any]:
    from curate.features.lm import encode_examples

    return [e for e in encode_examples(table, tok, max_length=max_length) if e.n_response > 0]


def batch_tensors(exs: list[Any], pad: int) -> tuple[Any, Any, Any]:
    import torch

    n = max(len(e.input_ids) for e in exs)
    ids = torch.full((len(exs), n), pad, dtype=torch.long)
    lab = torch.full((len(exs), n), -100, dtype=torch.long)
    att = torch.zeros((len(exs), n), dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        lab[i, : len(e.labels)] = torch.tensor(e.labels)
        att[i, : len(e.input_ids)] = 1
    return ids, lab, att


def example_losses(model: Any, exs: list[Any], pad: int, batch_size: int = 8) -> np.ndarray:
    """Mean response-token loss of each example."""
    import torch

    out = []
    with torch.no_grad():
        for s in range(0, len(exs), batch_size):
            ids, lab, att = batch_tensors(exs[s : s + batch_size], pad)
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            tgt = lab[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")
            mask = (tgt != -100).float()
            out.append(((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def fresh_model(base_state: dict[str, Any], lm: Any, n_layers: int, seed: int, rank: int) -> Any:
    """The base model with fresh seeded LoRA adapters on the last ``n_layers`` blocks only."""
    import peft
    import torch

    lm.load_state_dict(base_state)
    total = lm.config.num_hidden_layers
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          layers_to_transform=list(range(total - n_layers, total)))
    torch.manual_seed(seed)
    return peft.get_peft_model(lm, cfg)


def train_eval(subset: list[Any], evals: dict[str, list[Any]], lm: Any, base_state: dict[str, Any], pad: int,
               args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Fine-tune on ``subset`` (fixed steps) and return held-out loss per task."""
    import torch

    model = fresh_model(base_state, lm, args.lora_layers, seed, args.lora_rank)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    t0 = time.perf_counter()
    n_tokens = 0
    for _ in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.permutation(len(subset)).tolist()
        idx, order = order[: args.batch_size], order[args.batch_size :]
        ids, lab, att = batch_tensors([subset[i] for i in idx], pad)
        n_tokens += int(att.sum())
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    per_task = {t: float(example_losses(model, exs, pad).mean()) for t, exs in evals.items()}
    lm_back = model.unload()  # drop the adapters; the next run reloads the base weights
    del lm_back
    return {"loss": per_task, "train_s": train_s, "train_tok_per_s": n_tokens / max(train_s, 1e-9)}


def mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


class RunCache:
    """Finished trainings (held-out losses, timings) in a JSON-lines file, so a stopped run resumes.

    The key covers everything that changes a training: method, budget, seed, the chosen uids and the
    training hyperparameters.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.done[d["key"]] = d["out"]

    @staticmethod
    def key(method: str, budget: float | None, seed: int, uids: list[str], args: argparse.Namespace) -> str:
        import hashlib

        hp = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "max_length", "lora_layers", "lora_rank")}
        blob = json.dumps([method, budget, seed, sorted(uids), hp], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def put(self, key: str, out: dict[str, Any]) -> None:
        self.done[key] = out
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "out": out}) + "\n")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="300-row pool, 1 seed, 10%% budget, 24 steps (minutes)")
    p.add_argument("--pool", type=int, default=0, help="pool rows sampled after curation (0 = all)")
    p.add_argument("--targets-per-task", type=int, default=40, help="rows per task (half select, half evaluate)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["random", "less", "bids", "tarot"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lora-layers", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--grad-params", default="model.layers.28.mlp.down_proj.weight,model.layers.29.mlp.down_proj.weight",
                   help="parameters whose gradients are the LESS/BIDS features (grad_features 'params')")
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--no-full", action="store_true", help="skip the full-pool reference run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stop-at", type=stop_time, default=None, help="UTC HH:MM after which no new training starts; "
                   "what finished is recorded (per-method seed counts in the metrics)")
    p.add_argument("--workdir", default=str(HERE.parent / "runs" / "selection_quality"))
    args = p.parse_args(argv)
    if args.quick:
        args.pool, args.targets_per_task, args.budgets, args.seeds, args.steps = 300, 16, [0.1], [0], 24
    import torch

    torch.set_num_threads(args.threads)
    import curate
    from curate.features.lm import load_causal_lm

    work = Path(args.workdir)
    t_all = time.perf_counter()
    run = curate.run_recipe(curate.parse_recipe(curation_recipe(work), base=HERE))
    pool = pl.read_parquet(run.run_dir / "curated.parquet")
    n_curated = pool.height
    targets = pl.read_parquet(run.run_dir / "steps" / "00-ingest" / "targets.parquet")
    pool = pool.sort("uid")
    if args.pool and args.pool < pool.height:
        pool = pool[np.sort(np.random.default_rng(0).choice(pool.height, args.pool, replace=False))]
    sel_t, eval_t = target_halves(targets, args.targets_per_task)
    tag = f"pool{pool.height}_t{args.targets_per_task}_d{args.proj_dim}_L{args.max_length}"
    feats = features(pool, sel_t, work / "features" / tag, args)
    store = feats["store"]

    lm, tok = load_causal_lm("default", device="cpu")
    for prm in lm.parameters():
        prm.requires_grad_(False)
    base_state = {k: v.clone() for k, v in lm.state_dict().items()}
    pad = int(tok.pad_token_id or 0)
    enc_pool = {e.uid: e for e in encode(pool, tok, args.max_length)}
    evals = {t: encode(eval_t.filter(pl.col("task") == t), tok, args.max_length) for t in TASKS}
    base_loss = {t: float(example_losses(lm, exs, pad).mean()) for t, exs in evals.items()}
    common = {"pool_curated": n_curated, "pool": pool.height, "targets_per_task": args.targets_per_task,
              "n_eval": {t: len(v) for t, v in evals.items()}, "steps": args.steps, "batch_size": args.batch_size,
              "lr": args.lr, "max_length": args.max_length, "lora_layers": args.lora_layers,
              "lora_rank": args.lora_rank, "grad_params": args.grad_params, "proj_dim": args.proj_dim,
              "quick": args.quick}
    note = "IFEval left out: no reference answers in ../shared/data (no held-out answer loss, no target gradient)."
    record("selection_quality/base", common, {"loss": base_loss, "macro": float(np.mean(list(base_loss.values()))),
                                               "embed_s": feats["embed_s"], "grad_features_s": feats["grad_s"]},
           notes=note)
    rows = []
    # Blocks in order: the first budget, the full-pool reference, the other budgets. Inside a block the
    # trainings go seed-major (every method with seed 0, then seed 1, ...), so a run stopped by --stop-at
    # leaves every method of the block with the same number of seeds (±1). Each block is recorded as soon
    # as it is done; finished trainings are cached in the workdir, so a rerun resumes where it stopped.
    blocks: list[list[tuple[str, float | None]]] = [[(m, args.budgets[0]) for m in args.methods]]
    if not args.no_full:
        blocks.append([("full_pool", None)])
    blocks += [[(m, b) for m in args.methods] for b in args.budgets[1:]]
    cache = RunCache(work / "runs" / f"{tag}.jsonl")
    base_macro = float(np.mean(list(base_loss.values())))
    stop_at = args.stop_at  # POSIX time (parsed by stop_time) or None
    picks: dict[tuple[str, float | None, int], tuple[list[str], dict[str, Any]]] = {}
    for block in blocks:
        done: dict[tuple[str, float | None], list[dict[str, Any]]] = {g: [] for g in block}
        for seed in args.seeds:
            for method, budget in block:
                if method == "full_pool":
                    uids, diag = pool["uid"].to_list(), {}
                else:
                    s = seed if method == "random" else 0  # deterministic selectors pick the same subset
                    if (method, budget, s) not in picks:
                        picks[(method, budget, s)] = select(method, pool, store, sel_t, budget, s)
                    uids, diag = picks[(method, budget, s)]
                key = cache.key(method, budget, seed, uids, args)
                out = cache.get(key)
                if out is None and stop_at is not None and time.time() > stop_at:
                    print(f"{method:10s} budget={budget} seed={seed} skipped (past --stop-at)", flush=True)
                    continue
                if out is None:
                    subset = [enc_pool[u] for u in uids if u in enc_pool]
                    out = train_eval(subset, evals, lm, base_state, pad, args, seed)
                    cache.put(key, out)
                    how = f"{out['train_s']:.0f}s, {out['train_tok_per_s']:.0f} tok/s"
                else:
                    how = "cached"
                done[(method, budget)].append({**out, "seed": seed, "n_selected": len(uids), "diag": diag,
                                               "uids": uids})
                print(f"{method:10s} budget={budget} seed={seed} n={len(uids)} loss={out['loss']} ({how}) "
                      f"[{time.perf_counter() - t_all:.0f}s]", flush=True)
        for (method, budget), outs in done.items():
            if outs:
                rows.append(summarise(method, budget, outs, store, sel_t, base_macro, common, note))
    print(f"total {time.perf_counter() - t_all:.0f}s", flush=True)
    return {"rows": rows, "base": base_loss}


def stop_time(hhmm: str | None) -> float | None:
    """``HH:MM`` (UTC, today) as a POSIX time; None without a limit."""
    if not hhmm:
        return None
    import datetime as dt

    try:
        t = dt.datetime.strptime(hhmm, "%H:%M")
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stop-at {hhmm!r}: expected HH:MM (UTC), e.g. 15:30") from None
    now = dt.datetime.now(dt.UTC)
    return now.replace(hour=t.hour, minute=t.minute, second=0, microsecond=0).timestamp()


def summarise(method: str, budget: float | None, outs: list[dict[str, Any]], store: Any, sel_t: pl.DataFrame,
              base_macro: float, common: dict[str, Any], note: str) -> dict[str, Any]:
    """Mean ± std over the seeds of one (method, budget) and its ``record`` line."""
    per_task = {t: mean_std([o["loss"][t] for o in outs]) for t in TASKS}
    macros = [float(np.mean([o["loss"][t] for t in TASKS])) for o in outs]
    macro = mean_std(macros)
    infl = influence_by_task(store, outs[0]["uids"], sel_t)
    metrics = {
        "n_selected": outs[0]["n_selected"], "seeds": len(outs),
        "loss": {t: round(m, 4) for t, (m, _) in per_task.items()},
        "loss_std": {t: round(s, 4) for t, (_, s) in per_task.items()},
        "macro": round(macro[0], 4), "macro_std": round(macro[1], 4),
        "macro_by_seed": [round(x, 4) for x in macros],
        "delta_vs_base_macro": round(macro[0] - base_macro, 4),
        "influence_by_task": infl, "influence_spread": round(max(infl.values()) - min(infl.values()), 5),
        "train_s_per_run": round(float(np.mean([o["train_s"] for o in outs])), 1),
        "train_tok_per_s": round(float(np.mean([o["train_tok_per_s"] for o in outs])), 1),
        "peak_rss_mb": peak_rss_mb(),
    }
    diag = outs[0]["diag"]
    if method == "bids" and diag:
        metrics["bids_aid_raw"] = diag.get("aid_raw")
        metrics["bids_thi"] = diag.get("thi")
    seeds = [o["seed"] for o in outs]
    record("selection_quality", {**common, "method": method, "budget": budget, "seeds": seeds}, metrics,
           notes=note)
    return metrics


if __name__ == "__main__":
    main()
