"""EK-FAC influence benchmark: time and memory of fit and score, agreement with exact.

--quick: a tiny float64 transformer (tests/influence/_influence_models.py): EK-FAC vs the exact
block-diagonal Fisher (Pearson) and wall time relative to the identity baseline in the same process.
Default: SmolLM2-135M MLP layers on real Alpaca rows against GSM8K targets on CPU.

--cli: the issue's done-when run, ``curate influence fit`` + ``score`` through the CLI on SmolLM2
(MLP layers) for real Alpaca rows against GSM8K + MMLU targets.
--kronfluence: side by side with kronfluence 1.0.1 (same model, data, strategy, Fisher, damping).
kronfluence is not a project dependency; run this mode with a throwaway venv that sees our one::

    python3 -m venv /tmp/kfenv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/kfenv/lib/python3.11/site-packages/main.pth
    /tmp/kfenv/bin/pip install --no-deps kronfluence==1.0.1 einops einconv opt-einsum   # never torchvision
    PYTHONPATH=. /tmp/kfenv/bin/python benchmarks/bench_ekfac.py --kronfluence

Appends one JSON line to benchmarks/results.jsonl (``_common.record``).

    .venv/bin/python benchmarks/bench_ekfac.py --quick
    .venv/bin/python benchmarks/bench_ekfac.py --n-candidates 1000 --n-targets 100
    .venv/bin/python benchmarks/bench_ekfac.py --cli --n-candidates 200 --max-examples 100 --max-length 96
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quick() -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "influence"))
    from _influence_models import DT, TRACK, arith_sequences, pearson, sample_labels, trained_lm

    from curate.influence import CausalLMTask, Curvature, pairwise_scores
    from curate.influence.exact import exact_scores, fisher_blocks, per_example_grads

    torch.set_num_threads(1)  # tiny ops: thread sync costs more than it saves
    lm = trained_lm(0)
    task = CausalLMTask()
    fit = sample_labels(lm, arith_sequences(2048, 11), seed=0)
    queries, train = arith_sequences(16, 12), arith_sequences(64, 13)
    out: dict = {}
    for strategy in ("identity", "kfac", "ekfac"):
        t0 = time.perf_counter()
        c = Curvature(strategy=strategy, modules=TRACK, fisher="empirical", damping_scale=1.0, dtype=DT,
                      batch_size=256).fit(lm, task, fit)
        t1 = time.perf_counter()
        s = pairwise_scores(c, lm, task, queries, train, batch_size=32).values
        t2 = time.perf_counter()
        out[strategy] = {"fit_s": t1 - t0, "score_s": t2 - t1, "scores": s, "curv": c}
    lam = {n: out["ekfac"]["curv"].damping_of(n) for n in TRACK}
    t0 = time.perf_counter()
    fisher = fisher_blocks(per_example_grads(lm, task, fit, TRACK))
    ref = exact_scores(fisher, per_example_grads(lm, task, queries, TRACK),
                       per_example_grads(lm, task, train, TRACK), lam).numpy()
    exact_s = time.perf_counter() - t0
    base = out["identity"]["fit_s"] + out["identity"]["score_s"]
    return {
        "mode": "quick", "model": "tiny transformer (2 blocks, width 16), fc1/fc2", "n_fit": 2048,
        "n_targets": 16, "n_candidates": 64, "exact_s": exact_s,
        **{f"pearson_{k}_vs_exact": pearson(v["scores"], ref) for k, v in out.items()},
        **{f"{k}_fit_s": v["fit_s"] for k, v in out.items()},
        **{f"{k}_score_s": v["score_s"] for k, v in out.items()},
        "ekfac_time_ratio_vs_identity": (out["ekfac"]["fit_s"] + out["ekfac"]["score_s"]) / base,
        "exact_time_ratio_vs_ekfac": exact_s / (out["ekfac"]["fit_s"] + out["ekfac"]["score_s"]),
        "max_rss_mb": _rss_mb(),
    }


def full(n_candidates: int, n_targets: int, modules: str, query_rank: int | None, max_length: int) -> dict:
    import torch

    from curate.features.lm import encode_examples, load_causal_lm
    from curate.influence import CausalLMTask, Curvature, pairwise_scores
    from curate.schema import make_record, to_frame

    torch.set_num_threads(2)
    alpaca = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())[:n_candidates]
    pool = to_frame([make_record("sft", messages=[
        {"role": "user", "content": (r["instruction"] + ("\n\n" + r["input"] if r["input"] else ""))},
        {"role": "assistant", "content": r["output"] or "."}]) for r in alpaca])
    gsm = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:n_targets]]
    tgt = to_frame([make_record("target", task="gsm8k", messages=[{"role": "user", "content": r["question"]}],
                                answer=r["answer"]) for r in gsm])
    lm, tok = load_causal_lm("default", device="cpu")
    task = CausalLMTask(tok.pad_token_id)
    train = encode_examples(pool, tok, max_length=max_length)
    queries = encode_examples(tgt, tok, max_length=max_length)
    res: dict = {"mode": "full", "model": "SmolLM2-135M-Instruct", "modules": modules, "n_candidates": len(train),
                 "n_targets": len(queries), "max_length": max_length, "query_rank": query_rank}
    for strategy in ("identity", "ekfac"):
        t0 = time.perf_counter()
        c = Curvature(strategy=strategy, modules=modules, batch_size=4, max_examples=len(train)).fit(lm, task, train)
        t1 = time.perf_counter()
        s = pairwise_scores(c, lm, task, queries, train, batch_size=4, query_rank=query_rank)
        t2 = time.perf_counter()
        res[f"{strategy}_fit_s"], res[f"{strategy}_score_s"] = t1 - t0, t2 - t1
        res[f"{strategy}_finite"] = bool(np.isfinite(s.values).all())
    res["ekfac_time_ratio_vs_identity"] = (res["ekfac_fit_s"] + res["ekfac_score_s"]) / (
        res["identity_fit_s"] + res["identity_score_s"])
    res["max_rss_mb"] = _rss_mb()
    return res


def cli_run(n_candidates: int, n_gsm8k: int, n_mmlu: int, max_length: int, max_examples: int,
            query_rank: int | None, strategy: str, modules: str = "mlp") -> dict:
    """The issue's done-when run: ``curate influence fit`` + ``score`` on SmolLM2 (MLP layers) for
    real Alpaca rows against GSM8K and MMLU targets on CPU, through ``curate.cli.main``."""
    import tempfile

    import polars as pl
    import torch

    from curate.cli import main as cli_main
    from curate.io import read_sources
    from curate.io.writers import write_parquet

    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_ekfac_"))
    pool = read_sources([str(DATA / "alpaca" / "alpaca_5000.json")]).table.head(n_candidates)
    gsm = read_sources([str(DATA / "gsm8k" / "test.jsonl")], kind="target").table.head(n_gsm8k)
    mmlu_files = sorted((DATA / "mmlu" / "dev").glob("*.csv"))[: max(n_mmlu, 1)]
    mmlu = read_sources([str(f) for f in mmlu_files]).table
    mmlu = mmlu.group_by("task", maintain_order=True).head(1).head(n_mmlu).select(gsm.columns)
    tgt = pl.concat([gsm, mmlu], how="vertical_relaxed")
    write_parquet(pool, tmp / "pool.parquet")
    write_parquet(tgt, tmp / "targets.parquet")
    if modules.startswith("last"):  # e.g. "last8": the MLPs of the last 8 of SmolLM2's 30 layers
        k = int(modules[4:])
        modules = ",".join(f"model.layers.{i}.mlp.{p}" for i in range(30 - k, 30) for p in ("gate_proj", "up_proj", "down_proj"))
    res: dict = {"mode": "cli", "model": "SmolLM2-135M-Instruct", "modules": modules if modules == "mlp" else
                 f"{modules.count(',') + 1} MLP projections",
                 "strategy": strategy, "n_candidates": pool.height, "n_targets": tgt.height,
                 "targets": {"gsm8k": gsm.height, "mmlu": mmlu.height}, "max_length": max_length,
                 "max_examples": max_examples, "query_rank": query_rank, "threads": threads}
    fit_args = ["influence", "fit", str(tmp / "pool.parquet"), "-o", str(tmp / "factors"), "--strategy", strategy,
                "--max-examples", str(max_examples), "--max-length", str(max_length), "--modules", modules, "--json"]
    t0 = time.perf_counter()
    rc = cli_main(fit_args)
    res["fit_s"], res["fit_rc"], res["rss_after_fit_mb"] = time.perf_counter() - t0, rc, _rss_mb()
    score_args = ["influence", "score", str(tmp / "pool.parquet"), "--target", str(tmp / "targets.parquet"),
                  "--factors", str(tmp / "factors"), "-o", str(tmp / "scores"), "--json"]
    if query_rank:
        score_args += ["--query-rank", str(query_rank)]
    t0 = time.perf_counter()
    rc = cli_main(score_args)
    res["score_s"], res["score_rc"], res["max_rss_mb"] = time.perf_counter() - t0, rc, _rss_mb()
    vals = np.load(tmp / "scores" / "values.npy")
    res["scores_shape"] = list(vals.shape)
    res["scores_finite"] = bool(np.isfinite(vals).all())
    meta = json.loads((tmp / "scores" / "meta.json").read_text())
    tasks = dict(zip(tgt["uid"].to_list(), tgt["task"].to_list()))
    cols = np.array([tasks[u].split("/")[0] for u in meta["target_uids"]])
    # how similar are the candidate rankings of two targets of the same / different benchmarks
    from scipy.stats import spearmanr

    rho = spearmanr(vals).statistic if vals.shape[1] > 2 else np.eye(vals.shape[1])
    same = cols[:, None] == cols[None, :]
    off = ~np.eye(len(cols), dtype=bool)
    res["mean_spearman_same_benchmark"] = float(np.nanmean(np.asarray(rho)[same & off]))
    res["mean_spearman_cross_benchmark"] = float(np.nanmean(np.asarray(rho)[~same]))
    res["workdir"] = str(tmp)
    return res


def kronfluence_compare(n_train: int, n_queries: int, max_length: int, strategy: str, dtype_name: str,
                        threads: int) -> dict:
    """Side by side with kronfluence 1.0.1 (run with a python that has it, see the module doc).

    Same model (a seeded tiny Llama, byte tokenizer), same Alpaca rows (fit and train set) and GSM8K
    targets, same strategy, empirical Fisher, heuristic damping 0.1 × mean eigenvalue. Both fit on
    all training rows and score full rank. Pearson of the flattened score matrices and wall times.
    """
    import tempfile

    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    from curate.features.lm import encode_examples
    from curate.features.tiny import tiny_llama, tiny_tokenizer
    from curate.influence import CausalLMTask, Curvature, pairwise_scores
    from curate.io import read_sources

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype_name)
    tok = tiny_tokenizer()
    pool = read_sources([str(DATA / "alpaca" / "alpaca_5000.json")]).table.head(n_train)
    tgt = read_sources([str(DATA / "gsm8k" / "test.jsonl")], kind="target").table.head(n_queries)
    train = encode_examples(pool, tok, max_length=max_length)
    queries = encode_examples(tgt, tok, max_length=max_length)
    model = tiny_llama(vocab_size=len(tok), hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                       dtype=dtype_name, seed=0)
    names = [n for n, m in model.named_modules() if n.endswith(("gate_proj", "up_proj", "down_proj"))]
    ctask = CausalLMTask(tok.pad_token_id)
    bs = 8

    def collate(ex: list) -> dict:
        return ctask.collate(ex)

    class KTask(Task):
        def compute_train_loss(self, batch: dict, model: Any, sample: bool = False) -> Any:
            assert not sample  # empirical Fisher
            return ctask.loss(model, batch)

        def compute_measurement(self, batch: dict, model: Any) -> Any:
            return ctask.loss(model, batch)

        def get_influence_tracked_modules(self) -> list[str]:
            return names

        def get_attention_mask(self, batch: dict) -> Any:
            return batch["attention_mask"]

    class ListDS(torch.utils.data.Dataset):
        def __init__(self, rows: list) -> None:
            self.rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int) -> dict:
            return self.rows[i]

    res: dict = {"mode": "kronfluence", "strategy": strategy, "dtype": dtype_name, "threads": threads,
                 "model": "tiny Llama (2 layers, width 64, MLP 128, byte vocab 259), MLP gate/up/down",
                 "n_train": len(train), "n_queries": len(queries), "max_length": max_length,
                 "fisher": "empirical", "damping": "heuristic 0.1 x mean eigenvalue", "batch_size": bs}
    # ours
    t0 = time.perf_counter()
    curv = Curvature(strategy=strategy, modules=names, fisher="empirical", dtype=dt, batch_size=bs,
                     max_examples=None).fit(model, ctask, train)
    t1 = time.perf_counter()
    ours = pairwise_scores(curv, model, ctask, queries, train, batch_size=bs).values
    t2 = time.perf_counter()
    res["ours_fit_s"], res["ours_score_s"] = t1 - t0, t2 - t1
    # kronfluence (on a copy: prepare_model wraps modules in place)
    import copy

    kmodel = prepare_model(copy.deepcopy(model), KTask())
    out = tempfile.mkdtemp(prefix="kf_")
    an = Analyzer("bench", model=kmodel, task=KTask(), cpu=True, disable_tqdm=True, output_dir=out)
    dl = DataLoaderKwargs(collate_fn=collate)
    fargs = FactorArguments(strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=dt,
                            gradient_covariance_dtype=dt, per_sample_gradient_dtype=dt, lambda_dtype=dt)
    sargs = ScoreArguments(damping_factor=None, per_sample_gradient_dtype=dt, precondition_dtype=dt, score_dtype=dt)
    t0 = time.perf_counter()
    an.fit_all_factors("f", dataset=ListDS(train), per_device_batch_size=bs, factor_args=fargs,
                       dataloader_kwargs=dl, overwrite_output_dir=True)
    t1 = time.perf_counter()
    an.compute_pairwise_scores("s", factors_name="f", query_dataset=ListDS(queries), train_dataset=ListDS(train),
                               per_device_query_batch_size=bs, per_device_train_batch_size=bs, score_args=sargs,
                               dataloader_kwargs=dl, overwrite_output_dir=True)
    t2 = time.perf_counter()
    theirs = an.load_pairwise_scores("s")["all_modules"].double().numpy()
    res["kronfluence_fit_s"], res["kronfluence_score_s"] = t1 - t0, t2 - t1
    res["pearson"] = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    res["max_rel_diff"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    res["time_ratio_ours_vs_kronfluence"] = (res["ours_fit_s"] + res["ours_score_s"]) / (
        res["kronfluence_fit_s"] + res["kronfluence_score_s"])
    res["max_rss_mb"] = _rss_mb()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--cli", action="store_true", help="curate influence fit + score through the CLI (done-when run)")
    p.add_argument("--n-gsm8k", type=int, default=10)
    p.add_argument("--n-mmlu", type=int, default=10)
    p.add_argument("--max-examples", type=int, default=100)
    p.add_argument("--strategy", default="ekfac")
    p.add_argument("--kronfluence", action="store_true", help="side by side with kronfluence 1.0.1")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-queries", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-candidates", type=int, default=1000)
    p.add_argument("--n-targets", type=int, default=100)
    p.add_argument("--modules", default="mlp")
    p.add_argument("--query-rank", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    a = p.parse_args()
    if a.kronfluence:
        res = kronfluence_compare(a.n_train, a.n_queries, a.max_length, a.strategy, a.dtype, a.threads)
    elif a.cli:
        res = cli_run(a.n_candidates, a.n_gsm8k, a.n_mmlu, a.max_length, a.max_examples, a.query_rank, a.strategy,
                      a.modules)
    else:
        res = quick() if a.quick else full(a.n_candidates, a.n_targets, a.modules, a.query_rank, a.max_length)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import record

    params = {k: v for k, v in vars(a).items()}
    record("ekfac", params, res)


if __name__ == "__main__":
    main()
