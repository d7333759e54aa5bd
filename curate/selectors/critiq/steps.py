"""Recipe steps of CritiQ: ``critiq_mine`` and ``critiq_annotate`` (the Scorer is the ``critiq``
selector step, :class:`curate.selectors.critiq.scorer.CritiQSelector`).

Both keep every row: they write an artifact (the criteria JSON, the judged-pairs parquet) that a
later step reads by path, like ``curate critiq mine | annotate`` do. Relative file parameters in a
recipe file resolve against the recipe's folder (``path_params``; ``--set`` values against the working
directory); empty outputs default to the step folder.
A recipe chaining the three::

    - use: critiq_mine
      pairs: ../shared/data/pandalm/testset-v1.json   # ~30 human pairs are enough (n_pairs: 30)
      n_pairs: 30
      output: runs/critiq/criteria.json
      judge_url: http://127.0.0.1:8000/v1
    - use: critiq_annotate
      criteria: runs/critiq/criteria.json
      output: runs/critiq/pairs.parquet
      judge_url: http://127.0.0.1:8000/v1
    - use: embed
    - use: critiq
      pairs: runs/critiq/pairs.parquet
      features: {embed: embed/prompt+response}
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl

from curate.errors import param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext


@dataclass(frozen=True, kw_only=True)
class _JudgeParams:
    """Parameters shared by the steps that call a judge (the same as the CLI verbs' options)."""

    judge_url: str = ""
    judge_model: str = "smollm2-135m-instruct"
    max_tokens: int = 1024
    guided_choice: bool = False
    choice_format: str = "structured_outputs"
    cache: str = ".curate_cache/judge.sqlite"
    concurrency: int = 4
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    retries: int = 5

    def _check_judge(self, owner: str) -> None:
        if not isinstance(self.judge_url, str) or not self.judge_url.startswith(("http://", "https://")):
            raise param_error(owner, "judge_url", "an http(s) base URL of an OpenAI-compatible endpoint",
                              self.judge_url)
        for name in ("concurrency", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise param_error(owner, name, "an integer >= 1", v)
        if not isinstance(self.guided_choice, bool):
            raise param_error(owner, "guided_choice", "true or false", self.guided_choice)
        from curate.selectors.critiq.judge import check_choice_format

        check_choice_format(owner, self.choice_format)
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not self.timeout > 0 \
                or self.timeout == float("inf"):
            raise param_error(owner, "timeout", "a finite number of seconds > 0", self.timeout)
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise param_error(owner, "retries", "an integer >= 0", self.retries)

    def _session(self, url: str | None = None, model: str | None = None, concurrency: int | None = None) -> Any:
        from curate.selectors.critiq.judge import open_session

        return open_session(url or self.judge_url, model or self.judge_model, self.cache or None,  # type: ignore[arg-type]
                            self.api_key_env, concurrency or self.concurrency, timeout_s=float(self.timeout),
                            retries=self.retries, choice_format=self.choice_format)


def _keep_all(table: pl.DataFrame) -> pl.DataFrame:
    return table.select("uid", pl.lit(True).alias("keep"), pl.lit("").alias("reason"))


def _out_path(output: str, ctx: StepContext, default: str) -> Path:
    if output:
        return Path(output)
    return (ctx.step_dir or Path(".")) / default


@register_step("critiq_mine")
@dataclass(frozen=True, kw_only=True)
class CritiQMine(_JudgeParams):
    """Mine quality criteria from human preference pairs with the CritiQ Flow (Guo et al., ACL 2025,
    arXiv 2502.19279; docs/methods/critiq.md §3). Keeps every row of the table.

    The human pairs come from the file ``pairs`` (any preference format curate reads; the chosen
    response is the better one), not from the recipe's table, which is usually the unlabelled pool.

    Args:
        pairs: file of human preference pairs.
        n_pairs: a seeded random subset of this many preference rows (the recipe seed; None =
            all; the paper uses ~30).
        output: criteria JSON [default: ``<step dir>/criteria.json``].
        judge_url / judge_model: the worker endpoint; manager_url / manager_model default to them.
        kb: knowledge-base JSON, None for the starter KB, "none" to skip retrieval.
        guided_choice: restrict worker replies to the valid answers (vLLM, ``curate judge serve``).
        choice_format: how that restriction is sent: ``structured_outputs`` (vLLM >= 0.12, ``curate
            judge serve``), ``guided_choice`` (older vLLM), ``response_format`` (JSON-schema enum:
            hosted APIs, llama.cpp) or ``none`` (both steps).
        cache: SQLite judge cache ("" = none).
        timeout / retries: seconds per judge request; retries after 429/5xx, malformed replies,
            timeouts and refused connections (both steps).
        swap: ask every worker judgment in both orders; only verdicts that survive the swap count
            (curate.selectors.critiq.swap). Off by default here (doubles the worker calls).

    ``stats.json`` gets ``position_bias``: per criterion the position-bias, consistency and
    abstention rates, and ``warnings`` when the judge answers one letter in over 90% of calls.
    """

    path_params: ClassVar[tuple[str, ...]] = ("pairs", "output", "cache")
    path_or_name_params: ClassVar[tuple[str, ...]] = ("kb",)  # "none" and the starter KB are names
    pairs: str = ""
    n_pairs: int | None = None
    output: str = ""
    manager_url: str | None = None
    manager_model: str | None = None
    kb: str | None = None
    epochs: int = 3
    n_criteria: int = 20
    max_llm_calls: int | None = None
    swap: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pairs, str) or not self.pairs:
            raise param_error("critiq_mine", "pairs", "the path of a human preference-pairs file", self.pairs)
        if self.n_pairs is not None and (isinstance(self.n_pairs, bool) or not isinstance(self.n_pairs, int)
                                         or self.n_pairs < 1):
            raise param_error("critiq_mine", "n_pairs", "an integer >= 1 or null", self.n_pairs)
        self._check_judge("critiq_mine")
        if not isinstance(self.swap, bool):
            raise param_error("critiq_mine", "swap", "true or false", self.swap)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        import numpy as np

        from curate.io.tables import read_table
        from curate.selectors.critiq.annotate import human_pairs
        from curate.selectors.critiq.flow import CritiQFlow, FlowConfig
        from curate.selectors.critiq.kb import load_kb

        if not Path(self.pairs).exists():
            raise FileNotFoundError(f"step 'critiq_mine': pairs file not found: {self.pairs}.")
        t0 = time.time()
        human = read_table(self.pairs).filter(pl.col("kind") == "preference").sort("uid")
        if self.n_pairs is not None and human.height > self.n_pairs:
            order = np.random.default_rng(ctx.seed).permutation(human.height)[: self.n_pairs]
            human = human[sorted(order.tolist())]
        pairs = human_pairs(human)
        worker = self._session()
        manager = self._session(self.manager_url, self.manager_model, 1)
        kb = [] if self.kb == "none" else load_kb(self.kb)
        cfg = FlowConfig(n_criteria=self.n_criteria, epochs=self.epochs, max_llm_calls=self.max_llm_calls,
                         seed=ctx.seed, max_workers=self.concurrency, worker_max_tokens=self.max_tokens,
                         worker_guided_choice=self.guided_choice, swap=self.swap)
        res = CritiQFlow(worker, manager, cfg, kb=kb).run(pairs)
        out = res.save(_out_path(self.output, ctx, "criteria.json"))
        ctx.stats["critiq_mine"] = {"output": str(out), "n_pairs": len(pairs), "criteria": [c.name for c in res.criteria],
                                    "vote_accuracy": res.vote_accuracy, "calls": res.calls,
                                    "position_bias": res.position_bias,
                                    "seconds": round(time.time() - t0, 2)}
        return _keep_all(table)


@register_step("critiq_annotate")
@dataclass(frozen=True, kw_only=True)
class CritiQAnnotate(_JudgeParams):
    """Label length-bucketed random pairs of the table's rows by majority vote over mined criteria
    (docs/methods/critiq.md §7); writes the judged-pairs parquet the ``critiq`` selector trains on. Keeps
    every row. Resumable through the judge cache.

    Args:
        criteria: criteria JSON from ``critiq_mine`` / ``curate critiq mine``.
        output: judged pairs [default: ``<step dir>/pairs.parquet``].
        n_pairs: pairs to judge [default: min(25000, N/2)].
        swap: ask every judgment in both orders and count only verdicts that survive the swap
            (default on: a position-biased judge then abstains instead of labelling by position).

    ``stats.json`` gets ``position_bias`` as for ``critiq_mine``.
    """

    path_params: ClassVar[tuple[str, ...]] = ("criteria", "output", "cache")
    criteria: str = ""
    output: str = ""
    n_pairs: int | None = None
    n_buckets: int = 10
    swap: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.criteria, str) or not self.criteria:
            raise param_error("critiq_annotate", "criteria", "the path of a criteria JSON", self.criteria)
        self._check_judge("critiq_annotate")
        if isinstance(self.n_buckets, bool) or not isinstance(self.n_buckets, int) or self.n_buckets < 1:
            raise param_error("critiq_annotate", "n_buckets", "an integer >= 1", self.n_buckets)
        if not isinstance(self.swap, bool):
            raise param_error("critiq_annotate", "swap", "true or false", self.swap)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        from curate.io.writers import write_parquet
        from curate.selectors.critiq.annotate import annotate_table, check_labelled
        from curate.selectors.critiq.flow import load_criteria
        from curate.selectors.critiq.swap import PositionLog

        t0 = time.time()
        criteria = load_criteria(self.criteria)
        worker = self._session()
        log = PositionLog(self.swap, worker.name)
        out = annotate_table(table, criteria, worker, n_pairs=self.n_pairs, n_buckets=self.n_buckets, seed=ctx.seed,
                             max_workers=self.concurrency, max_tokens=self.max_tokens,
                             guided_choice=self.guided_choice, swap=self.swap, log=log)
        check_labelled(out, worker, len(criteria), swap=self.swap)
        path = write_parquet(out, _out_path(self.output, ctx, "pairs.parquet"))
        ctx.stats["critiq_annotate"] = {"output": str(path), "n_labelled": out.height, "n_criteria": len(criteria),
                                        "calls": worker.stats.as_dict(), "position_bias": log.report(),
                                        "seconds": round(time.time() - t0, 2)}
        return _keep_all(table)
