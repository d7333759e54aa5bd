"""CritiQ end to end on real PandaLM human pairs with the local SmolLM2 judge.

1. Ingest the PandaLM test set (three human annotators; ties and no-majority rows are dropped by
   the reader), seeded shuffle: ``--n-mine`` pairs to mine criteria from, a disjoint held-out set of
   ``--n-heldout`` pairs, and a disjoint pool of ``--pool-pairs`` pairs for agent annotation.
2. Start ``curate judge serve`` (packaged SmolLM2-135M-Instruct) as a subprocess on a free port of
   127.0.0.1 (``--server-threads`` torch threads), wait for ``/v1/models``, stop it at the end
   (also on error).
3. Mine criteria with the real :class:`CritiQFlow` (knowledge-base slice, warm-up, epochs), every
   call cached in ``runs/critiq/judge.sqlite`` so reruns are free. Workers answer with
   ``guided_choice`` (one of the valid JSON replies) unless ``--free-text``; the manager always
   writes free text.
4. Held-out agreement with the human label:
   - Flow: majority vote of the final criteria (or, clearly labelled, the best criteria found when
     none reaches 0.75);
   - Scorer: the criteria annotate the pool pairs (label hidden), a Bradley–Terry scorer on MiniLM
     embeddings is trained on the agent labels, then score(chosen) > score(rejected);
   - single prompt: the same model asked once "which is better, A or B?" per pair, in both orders.
   Reference points without the judge: the same Bradley–Terry scorer trained on the pool's human
   labels (ceiling of the embedding scorer), and "the longer response wins". ``--logit-diagnostic``
   adds a position-debiased reading of the local model's A/B logits.

Accuracy is over non-abstentions; abstention (no vote, a vote tie, an invalid reply, or two orders
that disagree) is reported separately with n.

    .venv/bin/python benchmarks/bench_critiq.py --quick
    .venv/bin/python benchmarks/bench_critiq.py --kb-size 8 --n-criteria 3 --server-threads 2   # recorded
    .venv/bin/python benchmarks/bench_critiq.py --n-mine 12 --free-text      # stop 14's free-text run
    .venv/bin/python benchmarks/bench_critiq.py --judge-url http://HOST:8000/v1 --judge-model NAME

The recorded 30-pair run takes about 23 minutes on an idle 2-core machine (≈ 2.5 s per worker
judgment). Without guided choice the Flow also needs the manager warm-up (one conversation, one
turn per mining pair), about 2 minutes per turn on a shared core once the conversation is long.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DATA, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "critiq"
PANDALM = DATA / "pandalm" / "testset-v1.json"
MODEL_NAME = "smollm2-135m-instruct"
# Generic criteria of the starter KB that apply to PandaLM's general instructions (no code/maths/safety).
KB_ORDER = ("instruction_adherence", "completeness", "relevance", "conciseness", "clarity_and_structure",
            "factual_accuracy", "language_quality", "format_compliance")
# Offsets into the shuffled order, so a --quick run's pairs are a prefix of the default run's (cache reuse).
HELDOUT_AT, POOL_AT = 100, 200


# --------------------------------------------------------------------------- judge server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class JudgeServer:
    """``curate judge serve`` in a subprocess with one torch thread. It stays in the caller's process
    group, so a harness that kills the group (benchmarks/run.py on timeout) kills the server too."""

    def __init__(self, log_path: Path, start_timeout_s: float = 900.0, threads: int = 1) -> None:
        self.threads = threads
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> JudgeServer:
        import httpx

        n = str(self.threads)
        env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n,
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        curate_bin = Path(sys.executable).with_name("curate")
        cmd = [str(curate_bin) if curate_bin.exists() else "curate", "judge", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __exit__

        def stop_and_exit(signum: int, _frame: Any) -> None:  # worker threads would keep a plain exit waiting
            self.__exit__()
            print(f"signal {signum}: judge server stopped; judge replies so far are in the cache", flush=True)
            os._exit(128 + signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop_and_exit)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"judge server exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    if httpx.get(f"{self.url}/models", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - t0 > self.start_timeout_s:
                    raise RuntimeError(f"judge server not up after {self.start_timeout_s:.0f} s; see {self.log_path}")
                time.sleep(1.0)
        except BaseException:
            self.__exit__()
            raise
        self.startup_s = time.monotonic() - t0
        print(f"judge server up at {self.url} after {self.startup_s:.1f} s (pid {self.proc.pid})", flush=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                p.terminate()
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


class ExternalJudge:
    """An endpoint started by someone else (``--judge-url``): nothing to start or stop."""

    def __init__(self, url: str) -> None:
        self.url, self.startup_s = url.rstrip("/"), 0.0

    def __enter__(self) -> ExternalJudge:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


# --------------------------------------------------------------------------- metrics
def agreement(preds: list[str | None], answers: list[str]) -> dict[str, Any]:
    """Accuracy over non-abstentions (None = abstain), abstention rate, n."""
    n = len(preds)
    decided = [(p, a) for p, a in zip(preds, answers, strict=True) if p is not None]
    correct = sum(p == a for p, a in decided)
    return {"n": n, "n_decided": len(decided), "abstention_rate": round(1 - len(decided) / n, 4) if n else None,
            "accuracy": round(correct / len(decided), 4) if decided else None,
            "accuracy_abstain_as_wrong": round(correct / n, 4) if n else None}


def status_counts(results: list[Any]) -> dict[str, int]:
    out = {"ok": 0, "abstain": 0, "invalid": 0}
    for r in results:
        out[r.status] += 1
    return out


def raw_stats(results: list[Any]) -> dict[str, Any]:
    """How far the raw replies are from the JSON contract (to explain invalid rates)."""
    raws = [r.raw for r in results if r.status == "invalid"]
    return {"invalid": len(raws), "invalid_with_brace": sum("{" in r for r in raws),
            "example": raws[0][:200] if raws else None}


_LENIENT = (re.compile(r'"answer"\s*:\s*"?\s*([AB])\b'),
            re.compile(r"\b(?:[Tt]ext|[Rr]esponse|better one is|[Aa]nswer(?: is)?)\s*:?\s*\"?([AB])\b"))


def lenient_vote(raw: str) -> str | None:
    """A post-hoc, non-contract reading of a free-text reply: an "answer" field, else the first
    "Text A/B", "Response A/B", "better one is A/B" or "answer is A/B" (diagnostic only)."""
    for rx in _LENIENT:
        m = rx.search(raw or "")
        if m:
            return m.group(1)
    return None


def logit_diagnostic(pairs: list[Any], criteria: list[Any], max_chars: int) -> dict[str, Any]:
    """Is there a preference signal under the position bias? For each held-out pair, d = logit(A) −
    logit(B) of the first diverging token after ``{"answer": "``, in both orders; the debiased vote
    is A when d(original) > d(swapped). Single prompt and the first criterion used (diagnostic:
    greedy guided replies only see the sign of d in one order)."""
    import torch

    from curate.selectors.critiq.flow import single_prompt_messages, worker_messages
    from curate.selectors.critiq.server import LMBackend

    torch.set_num_threads(1)
    b = LMBackend("default", device="cpu").load()
    common = b.choice_tokens(['{"answer": "'])[0]
    tok_a, tok_b = b.choice_tokens(["A"])[0][0], b.choice_tokens(["B"])[0][0]

    def d(msgs: list[dict[str, str]]) -> float:
        ids = b._prompt_ids(msgs)[0].tolist() + common
        with torch.no_grad():
            lg = b._lm(torch.tensor([ids])).logits[0, -1].double()
        return float(lg[tok_a] - lg[tok_b])

    out: dict[str, Any] = {}
    makers = [("single_prompt", lambda p: single_prompt_messages(p, None, max_chars))]
    makers += [(f"criterion:{c.name}", lambda p, c=c: worker_messages(c, p, max_chars)) for c in criteria]
    answers = [p.answer for p in pairs]
    for name, make in makers:
        d1 = [d(make(p)) for p in pairs]
        d2 = [d(make(p.swapped())) for p in pairs]
        votes = ["A" if x > y else ("B" if x < y else None) for x, y in zip(d1, d2, strict=True)]
        out[name] = {**agreement(votes, answers), "share_d_positive": round(float(np.mean(np.array(d1 + d2) > 0)), 4),
                     "mean_d": round(float(np.mean(d1 + d2)), 3)}
    return out


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="plumbing check: 4 mining and 4 held-out pairs, 1 KB criterion, short replies")
    ap.add_argument("--n-mine", type=int, default=30)
    ap.add_argument("--n-heldout", type=int, default=40)
    ap.add_argument("--pool-pairs", type=int, default=30, help="pool pairs annotated by the criteria (scorer)")
    ap.add_argument("--human-pool", type=int, default=600, help="pool pairs with human labels (scorer ceiling)")
    ap.add_argument("--kb-size", type=int, default=4, help="first criteria of KB_ORDER used as the knowledge base")
    ap.add_argument("--n-criteria", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-reflections", type=int, default=2)
    ap.add_argument("--worker-max-tokens", type=int, default=64)
    ap.add_argument("--manager-max-tokens", type=int, default=128)
    ap.add_argument("--worker-retries", type=int, default=0,
                    help="re-asks after a parse failure (greedy decoding repeats itself, so 0 by default)")
    ap.add_argument("--manager-retries", type=int, default=1)
    ap.add_argument("--max-chars", type=int, default=1200, help="each text in a worker prompt is cut to this")
    ap.add_argument("--max-chars-manager", type=int, default=600)
    ap.add_argument("--no-baseline-swap", action="store_true", help="ask the single prompt in one order only")
    ap.add_argument("--free-text", dest="guided_choice", action="store_false",
                    help="let workers write free text (the stop-14 run) instead of guided_choice replies")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the judge server")
    ap.add_argument("--logit-diagnostic", action="store_true",
                    help="after the run, load the judge model in-process and read its A-vs-B logit in both "
                         "orders on the held-out pairs (position-debiased signal; local model only)")
    ap.add_argument("--embed-prompt-chars", type=int, default=300,
                    help="the scorer embeds the instruction cut to this many characters, then the response "
                         "(MiniLM reads 256 word pieces; a long instruction would hide the response)")
    ap.add_argument("--cache", default=str(RUNS / "judge.sqlite"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge-url", default=None,
                    help="use this OpenAI-compatible endpoint (e.g. vLLM) instead of starting `curate judge serve`")
    ap.add_argument("--judge-model", default=MODEL_NAME, help="model name sent to --judge-url")
    ap.add_argument("--no-record", action="store_true", help="do not append to results.jsonl (dev runs)")
    args = ap.parse_args()
    if args.quick:
        args.n_mine, args.n_heldout, args.pool_pairs, args.kb_size, args.n_criteria = 4, 4, 4, 1, 1
        args.human_pool, args.worker_max_tokens, args.manager_max_tokens = 100, 32, 48
        args.manager_retries, args.no_baseline_swap = 0, True

    t_start = time.perf_counter()
    tag = "_quick" if args.quick else ""
    import polars as pl

    from curate.cli.critiq import human_pairs, render_pair_texts
    from curate.io.tables import read_table
    from curate.selectors.critiq.flow import (
        CritiQFlow,
        FlowConfig,
        judge_pairs,
        judge_single_prompt,
        majority_vote,
        swap_pairs,
    )
    from curate.selectors.critiq.judge import JudgeCache, JudgeSession, OpenAICompatJudge
    from curate.selectors.critiq.kb import STARTER_KB
    from curate.selectors.critiq.scorer import fit_bradley_terry

    # 1. data
    table = read_table(PANDALM)
    table = table.filter(pl.col("kind") == "preference").sort("uid")
    n_rows = table.height
    perm = np.random.default_rng(args.seed).permutation(n_rows)
    assert args.n_mine <= HELDOUT_AT and args.n_heldout <= POOL_AT - HELDOUT_AT
    mine_t = table[perm[: args.n_mine].tolist()]
    held_t = table[perm[HELDOUT_AT : HELDOUT_AT + args.n_heldout].tolist()]
    pool_idx = perm[POOL_AT:]
    mine_pairs = human_pairs(mine_t)  # chosen is A; the Flow swaps with its seeded stream
    held_pairs = swap_pairs(human_pairs(held_t), args.seed + 7)  # the worker must not see the better one as A
    held_answers = [p.answer for p in held_pairs]
    print(f"PandaLM: {n_rows} preference rows with a human majority; mine {len(mine_pairs)}, "
          f"held-out {len(held_pairs)} (better = A in {held_answers.count('A')}), pool {len(pool_idx)}", flush=True)

    kb_all = dict(STARTER_KB)
    kb = [(n, kb_all[n]) for n in KB_ORDER[: args.kb_size]]
    cfg = FlowConfig(n_criteria=args.n_criteria, epochs=args.epochs, max_retries=args.manager_retries,
                     max_reflections_per_criterion=args.max_reflections, max_chars_manager=args.max_chars_manager,
                     max_chars_worker=args.max_chars, worker_max_tokens=args.worker_max_tokens,
                     manager_max_tokens=args.manager_max_tokens, max_workers=1, seed=args.seed,
                     worker_guided_choice=args.guided_choice)
    wkw = {"temperature": 0.0, "max_tokens": args.worker_max_tokens, "seed": args.seed,
           "max_chars": args.max_chars, "max_workers": 1, "guided_choice": args.guided_choice}
    metrics: dict[str, Any] = {}
    timings: dict[str, float] = {}
    RUNS.mkdir(parents=True, exist_ok=True)

    with (ExternalJudge(args.judge_url) if args.judge_url else JudgeServer(RUNS / "serve.log", threads=args.server_threads)) as server:
        timings["server_startup_s"] = round(server.startup_s, 1)
        cache = JudgeCache(args.cache)
        worker = JudgeSession(OpenAICompatJudge(server.url, args.judge_model, max_concurrency=1, timeout_s=900,
                                                    endpoint="curate-judge-serve"),
                              cache, max_retries=args.worker_retries)
        manager = JudgeSession(OpenAICompatJudge(server.url, args.judge_model, max_concurrency=1, timeout_s=900,
                                                    endpoint="curate-judge-serve"),
                               cache, max_retries=args.manager_retries)

        # 2. mine
        t0 = time.perf_counter()
        flow = CritiQFlow(worker, manager, cfg, kb=kb, log=lambda m: print(f"[flow] {m}", flush=True))
        res = flow.run(mine_pairs)
        res.save(RUNS / f"criteria{tag}.json")
        timings["mine_s"] = round(time.perf_counter() - t0, 1)
        kb_acc = next((h["accuracy"] for h in res.history if h["phase"] == "kb_retrieval"), {})
        metrics["flow_mining"] = {
            "final_criteria": [{"name": c.name, "accuracy": c.accuracy, "version": c.version} for c in res.criteria],
            "best": {n: c.accuracy for n, c in sorted(res.best.items())}, "kb_accuracy": kb_acc,
            "train_vote_accuracy": res.vote_accuracy, "calls": res.calls,
            "history": [{k: v for k, v in h.items() if k in ("phase", "vote_accuracy", "retrieved", "proposed",
                                                            "refined", "new", "final")} for h in res.history],
        }
        print(f"[flow] final criteria: {[c.name for c in res.criteria]} (train vote accuracy {res.vote_accuracy})",
              flush=True)

        criteria = list(res.criteria)
        criteria_source = "final (>= 0.75 on the mining pairs)"
        if not criteria:
            mids = sorted((c for c in res.best.values() if (c.accuracy or 0.0) > cfg.thresholds[0]),
                          key=lambda c: (-(c.accuracy or 0.0), c.name))
            criteria = [replace(c) for c in mids[: args.n_criteria]]
            criteria_source = ("FALLBACK: no criterion reached 0.75; best versions with accuracy > 0.5"
                               if criteria else "NONE: no criterion above 0.5 on the mining pairs")
        metrics["criteria_used"] = {"source": criteria_source,
                                    "names": [c.name for c in criteria], "accuracy": [c.accuracy for c in criteria]}
        print(f"criteria used for evaluation: {criteria_source}: {[c.name for c in criteria]}", flush=True)

        # 3a. Flow on held-out pairs
        t0 = time.perf_counter()
        if criteria:
            hres = judge_pairs(worker, criteria, held_pairs, phase="heldout_flow", **wkw)
            names = sorted(hres)
            votes = [majority_vote([hres[n][i] for n in names], cfg.voting_threshold) for i in range(len(held_pairs))]
            flat = [r for n in names for r in hres[n]]
            metrics["flow"] = {**agreement(votes, held_answers), "criteria_source": criteria_source,
                               "per_criterion": {n: agreement([r.vote for r in hres[n]], held_answers) for n in names},
                               "worker_replies": status_counts(flat), "raw": raw_stats(flat),
                               "position_bias_share_A": round(sum(r.vote == "A" for r in flat)
                                                              / max(1, sum(r.vote in ("A", "B") for r in flat)), 4)}
        else:
            metrics["flow"] = {**agreement([None] * len(held_pairs), held_answers), "criteria_source": criteria_source}
        timings["heldout_flow_s"] = round(time.perf_counter() - t0, 1)
        print(f"[flow] held-out: {metrics['flow']}", flush=True)

        # 3c. single-prompt baseline, both orders
        t0 = time.perf_counter()
        r1 = judge_single_prompt(worker, held_pairs, None, phase="heldout_single", **wkw)
        v1 = [r.vote for r in r1]
        base: dict[str, Any] = {"order_1": agreement(v1, held_answers)}
        flat = list(r1)
        if not args.no_baseline_swap:
            sw = [p.swapped() for p in held_pairs]
            r2 = judge_single_prompt(worker, sw, None, phase="heldout_single", **wkw)
            flat += r2
            back = {"A": "B", "B": "A", None: None}
            v2 = [back[r.vote] for r in r2]  # in the frame of held_pairs
            both = [a if (a is not None and a == b) else None for a, b in zip(v1, v2, strict=True)]
            base["order_2"] = agreement(v2, held_answers)
            base["both_orders_pooled"] = agreement(v1 + v2, held_answers + held_answers)
            base["consistent_both_orders"] = agreement(both, held_answers)
            base["position_bias_share_A"] = round(
                sum(r.vote == "A" for r in flat) / max(1, sum(r.vote in ("A", "B") for r in flat)), 4)
            l1 = [r.vote if r.status == "ok" else lenient_vote(r.raw) for r in r1]
            l2 = [back[r.vote if r.status == "ok" else lenient_vote(r.raw)] for r in r2]
            base["lenient_reading_diagnostic"] = {
                "rule": "strict vote if the JSON parsed, else the first A/B named in the free text (not the contract)",
                "order_1": agreement(l1, held_answers), "order_2": agreement(l2, held_answers),
                "consistent_both_orders": agreement([a if (a is not None and a == b) else None
                                                     for a, b in zip(l1, l2, strict=True)], held_answers)}
        base["worker_replies"] = status_counts(flat)
        base["raw"] = raw_stats(flat)
        metrics["single_prompt"] = base
        timings["heldout_single_s"] = round(time.perf_counter() - t0, 1)
        print(f"[single] held-out: {base}", flush=True)

        # 3b. agent annotation of pool pairs (label hidden, seeded A/B swap)
        t0 = time.perf_counter()
        pool_t = table[pool_idx[: args.pool_pairs].tolist()]
        pool_pairs = swap_pairs(human_pairs(pool_t), args.seed + 11)
        agent_rows: list[tuple[str, str]] = []
        if criteria:
            pres = judge_pairs(worker, criteria, pool_pairs, phase="annotate", **wkw)
            names = sorted(pres)
            pvotes = [majority_vote([pres[n][i] for n in names], cfg.voting_threshold) for i in range(len(pool_pairs))]
            for p, v in zip(pool_pairs, pvotes, strict=True):
                if v is not None:
                    agent_rows.append((p.a_id, p.b_id) if v == "A" else (p.b_id, p.a_id))
            metrics["annotation"] = {"n_pairs": len(pool_pairs), "n_labelled": len(agent_rows),
                                     "agreement_with_human": agreement(pvotes, [p.answer for p in pool_pairs]),
                                     "worker_replies": status_counts([r for n in names for r in pres[n]])}
        else:
            metrics["annotation"] = {"n_pairs": len(pool_pairs), "n_labelled": 0, "skipped": "no criteria"}
        timings["annotate_s"] = round(time.perf_counter() - t0, 1)
        print(f"[annotate] {metrics['annotation']}", flush=True)
        judge_stats = {"worker": worker.stats.as_dict(), "manager": manager.stats.as_dict()}
        cache.close()
    # the server is stopped here

    if args.logit_diagnostic and not args.judge_url:
        t0 = time.perf_counter()
        metrics["logit_diagnostic"] = logit_diagnostic(held_pairs, criteria[:1], args.max_chars)
        timings["logit_diagnostic_s"] = round(time.perf_counter() - t0, 1)
        print(f"[logit] {metrics['logit_diagnostic']}", flush=True)

    # 3b'. Bradley–Terry scorers on MiniLM embeddings (no judge needed)
    t0 = time.perf_counter()
    import torch

    from curate.features.embed import embed_texts

    torch.set_num_threads(1)

    hp_t = table[pool_idx[: max(args.human_pool, args.pool_pairs)].tolist()]
    hp_a, hp_b = render_pair_texts(hp_t, args.embed_prompt_chars)
    pool_uids = hp_t["uid"].to_list()
    held_c, held_r = render_pair_texts(held_t, args.embed_prompt_chars)
    texts_all = hp_a + hp_b + held_c + held_r
    emb = embed_texts(texts_all, model="default", batch_size=32)
    n_hp, n_h = len(hp_a), len(held_c)
    index = {f"{u}:chosen": i for i, u in enumerate(pool_uids)} | {f"{u}:rejected": n_hp + i for i, u in enumerate(pool_uids)}
    e_held_c, e_held_r = emb[2 * n_hp : 2 * n_hp + n_h], emb[2 * n_hp + n_h :]

    def eval_scorer(fn: Any) -> dict[str, Any]:
        sc, sr = fn(e_held_c), fn(e_held_r)
        preds = ["A" if a > b else ("B" if a < b else None) for a, b in zip(sc, sr, strict=True)]
        return agreement(preds, ["A"] * n_h)

    if len(agent_rows) >= 2 and len({w for w, _ in agent_rows}) > 0:
        w = np.asarray([index[a] for a, _ in agent_rows])
        lo = np.asarray([index[b] for _, b in agent_rows])
        fn = fit_bradley_terry(emb, w, lo, scorer="embedding_linear", seed=args.seed)
        metrics["scorer"] = {**eval_scorer(fn), "n_train_pairs": len(agent_rows), "labels": "agent (criteria vote)"}
    else:
        metrics["scorer"] = {**agreement([None] * n_h, ["A"] * n_h), "n_train_pairs": len(agent_rows),
                             "skipped": "fewer than 2 agent-labelled pairs: nothing to train on"}
    fn_h = fit_bradley_terry(emb, np.arange(n_hp), n_hp + np.arange(n_hp), scorer="embedding_linear", seed=args.seed)
    metrics["scorer_human_labels_ceiling"] = {**eval_scorer(fn_h), "n_train_pairs": n_hp, "labels": "human"}
    lc, lr = [len(t) for t in held_c], [len(t) for t in held_r]
    metrics["longer_wins"] = agreement(["A" if a > b else ("B" if a < b else None) for a, b in zip(lc, lr, strict=True)],
                                       ["A"] * n_h)
    timings["scorer_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    metrics["timings"] = timings
    metrics["judge_calls"] = judge_stats
    print(f"[scorer] agent: {metrics['scorer']}\n[scorer] human-label ceiling: {metrics['scorer_human_labels_ceiling']}"
          f"\n[length] {metrics['longer_wins']}", flush=True)

    params = {k: v for k, v in vars(args).items()}
    params.update({"model": args.judge_model, "kb": [n for n, _ in kb], "torch_threads": 1, "data": "pandalm/testset-v1.json",
                   "n_rows_with_majority": n_rows})
    summary = {k: metrics[k] for k in ("flow", "single_prompt", "scorer", "scorer_human_labels_ceiling", "longer_wins")}
    (RUNS / f"bench_summary{tag}.json").write_text(json.dumps({"params": params, "metrics": metrics}, indent=2, default=str))
    if not args.no_record:
        judge_desc = args.judge_url or (f"SmolLM2-135M-Instruct via `curate judge serve`, {args.server_threads} "
                                        "torch thread(s), CPU")
        judge_desc += "; workers: guided_choice" if args.guided_choice else "; workers: free text"
        record("critiq_pandalm", params, metrics, notes=f"judge: {judge_desc}; criteria: {criteria_source}")
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
