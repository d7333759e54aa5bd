"""Table-level influence: fit factors on a canonical table, score candidates against targets.

This is what ``curate influence fit`` / ``score`` and recipe steps call (specs/ekfac.md; issue 5).
Rows are encoded with ``curate.features.lm.encode_examples`` (chat template, prompt tokens -100).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl

from curate.errors import SchemaError
from curate.schema import texts


def _encode(table: pl.DataFrame, tokenizer: Any, max_length: int, what: str) -> list[Any]:
    from curate.features.lm import encode_examples

    enc = encode_examples(table, tokenizer, max_length=max_length)
    empty = [e.uid for e in enc if e.n_response == 0]
    if empty:
        raise SchemaError(f"{what} rows without response tokens cannot be scored (e.g. uid {empty[0]}).",
                          field="messages", expected="an assistant turn or a reference answer",
                          found=f"{len(empty)} rows without one")
    return enc


def fit_table(
    table: pl.DataFrame, out_dir: str | os.PathLike[str], *, model: str = "default", strategy: str = "ekfac",
    modules: str = "mlp", fisher: str = "true", max_examples: int = 2000, batch_size: int = 4,
    max_length: int = 256, device: str = "cpu", seed: int = 0,
) -> Path:
    """Fit curvature factors of ``model`` on a seeded sample of ``table`` and save them to ``out_dir``."""
    from curate.features.lm import load_causal_lm
    from curate.influence.curvature import Curvature
    from curate.influence.task import CausalLMTask

    lm, tok = load_causal_lm(model, device=device)
    curv = Curvature(strategy=strategy, modules=modules, fisher=fisher, seed=seed, batch_size=batch_size,
                     max_examples=max_examples)
    curv.fit(lm, CausalLMTask(tok.pad_token_id), _encode(table, tok, max_length, "fit"))
    return curv.save(out_dir)


def score_tables(
    table: pl.DataFrame, targets: pl.DataFrame, factors_dir: str | os.PathLike[str], *, model: str = "default",
    damping: float | str | None = None, query_rank: int | None = None, tfidf_top: int | None = None,
    batch_size: int = 4, max_length: int = 256, device: str = "cpu", normalize: str = "none",
) -> Any:
    """Scores (targets × candidates, uids on both axes) with factors from :func:`fit_table`."""
    from curate.features.lm import load_causal_lm
    from curate.influence.curvature import Curvature
    from curate.influence.scores import pairwise_scores
    from curate.influence.task import CausalLMTask
    from curate.influence.tfidf import tfidf_topk

    curv = Curvature.from_folder(factors_dir, damping=damping)
    lm, tok = load_causal_lm(model, device=device)
    train = _encode(table, tok, max_length, "candidate")
    queries = _encode(targets, tok, max_length, "target")
    cand = None
    if tfidf_top is not None:
        cand = tfidf_topk(texts(targets), texts(table), tfidf_top, table["uid"].to_list())
    return pairwise_scores(curv, lm, CausalLMTask(tok.pad_token_id), queries, train,
                           query_uids=[e.uid for e in queries], train_uids=[e.uid for e in train],
                           batch_size=batch_size, query_rank=query_rank, candidates=cand, normalize=normalize)
