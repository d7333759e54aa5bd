"""Table-level influence: fit factors on a canonical table, score candidates against targets.

This is what ``curate influence fit`` / ``score`` and the ``influence_scores`` recipe step call
(docs/methods/ekfac.md). Rows are encoded with ``curate.features.lm.encode_examples`` (chat
template, prompt tokens -100).

The factors folder records the model (path or ``"default"``), the optional checkpoint and a
fingerprint of the tracked weights, so :func:`score_tables` loads the same model by default and
refuses a different one (a mismatch would silently give meaningless scores).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.errors import ParameterError, SchemaError
from curate.schema import texts


def _encode(table: pl.DataFrame, tokenizer: Any, max_length: int, what: str) -> list[Any]:
    from curate.features.lm import encode_examples

    if table.height == 0:
        raise SchemaError(f"the {what} table is empty.", field="uid", expected="at least one row", found=0)
    enc = encode_examples(table, tokenizer, max_length=max_length)
    empty = [e.uid for e in enc if e.n_response == 0]
    if empty:
        raise SchemaError(f"{what} rows without response tokens cannot be scored (e.g. uid {empty[0]}).",
                          field="messages", expected="an assistant turn or a reference answer",
                          found=f"{len(empty)} rows without one")
    return enc


def load_model(model: str = "default", checkpoint: str | os.PathLike[str] | None = None, *,
               device: str = "cpu") -> tuple[Any, Any]:
    """The causal LM and tokenizer to fit or score with.

    Args:
        model: ``"default"`` (packaged SmolLM2-135M-Instruct) or a local Hugging Face folder.
        checkpoint: optional fine-tuned state: a peft adapter folder (``adapter_config.json``; the
            adapters are merged so the tracked modules stay plain ``nn.Linear``) or a full model
            folder (``config.json``; replaces ``model``, its tokenizer is used when it has one).
        device: ``cpu`` | ``cuda`` | ``auto``.
    """
    from curate._lazy import require
    from curate.features.lm import load_causal_lm

    lm, tok = load_causal_lm(model, device=device)
    if checkpoint is None:
        return lm, tok
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder not found.")
    if (folder / "adapter_config.json").exists():
        peft = require("peft", "LoRA checkpoints")
        lm = peft.PeftModel.from_pretrained(lm, str(folder)).merge_and_unload()
        lm.eval()
        return lm, tok
    if (folder / "config.json").exists():
        lm2, tok2 = load_causal_lm(str(folder), device=device)
        has_tok = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        return lm2, tok2 if has_tok else tok
    raise SchemaError("not a checkpoint.", file=str(folder),
                      expected="a peft adapter folder (adapter_config.json) or a model folder (config.json)")


def model_fingerprint(model: Any, names: list[str]) -> dict[str, list[float]]:
    """Per tracked module: [Σw, Σw², Σ|w|] of its weight in float64 (cheap, detects another model)."""
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        w = mods[n].weight.detach().double()
        out[n] = [float(w.sum()), float((w * w).sum()), float(w.abs().sum())]
    return out


def check_model(curv: Any, model: Any, *, where: str = "factors") -> None:
    """Refuse scoring ``model`` with factors fitted on another one (names, shapes, fingerprint).

    Raises:
        SchemaError: a tracked module is missing, has other dimensions or other weights.
    """
    from curate.features.capture import layer_dims

    mods = dict(model.named_modules())
    missing = [n for n in curv.names if n not in mods]
    if missing:
        raise SchemaError(f"the factors track modules this model does not have, e.g. {missing[:3]}.",
                          file=where, field="names", expected="factors fitted on this model",
                          found=f"{len(missing)} unknown modules")
    for n in curv.names:
        got = layer_dims(mods[n])
        if tuple(got) != tuple(curv.dims[n]):
            raise SchemaError(f"module '{n}' has other dimensions than the factors.", file=where, field=n,
                              expected=str(tuple(curv.dims[n])), found=str(tuple(got)))
    saved = curv.extra.get("fingerprint")
    if saved:
        now = model_fingerprint(model, curv.names)
        for n in curv.names:
            a, b = np.asarray(saved.get(n, [np.nan] * 3)), np.asarray(now[n])
            if not np.allclose(a, b, rtol=1e-5, atol=1e-6):
                raise SchemaError(f"module '{n}' has other weights than the model the factors were fitted on "
                                  f"({curv.extra.get('model')!r}, checkpoint {curv.extra.get('checkpoint')!r}).",
                                  file=where, field=n, expected="the same model and checkpoint as at fit time",
                                  found="different weights")


def fit_table(
    table: pl.DataFrame, out_dir: str | os.PathLike[str], *, model: str = "default",
    checkpoint: str | os.PathLike[str] | None = None, strategy: str = "ekfac", modules: str = "mlp",
    fisher: str = "true", max_examples: int = 2000, batch_size: int = 4, max_length: int = 256,
    device: str = "cpu", seed: int = 0,
) -> Path:
    """Fit curvature factors of ``model`` on a seeded sample of ``table`` and save them to ``out_dir``.

    The fit set is the candidate pool (the training distribution, docs/methods/ekfac.md §4), never the
    targets. The folder records the model, checkpoint and a weight fingerprint.
    """
    from curate.influence.curvature import Curvature
    from curate.influence.task import CausalLMTask

    curv = Curvature(strategy=strategy, modules=modules, fisher=fisher, seed=seed, batch_size=batch_size,
                     max_examples=max_examples)
    lm, tok = load_model(model, checkpoint, device=device)
    # sorted by uid: the seeded fit sample depends on the rows, not on their order
    curv.fit(lm, CausalLMTask(tok.pad_token_id), _encode(table.sort("uid"), tok, max_length, "fit"))
    extra = {"model": str(model) if str(model) == "default" else str(Path(model).resolve()),
             "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
             "max_length": max_length, "fingerprint": model_fingerprint(lm, curv.names)}
    return curv.save(out_dir, extra=extra)


def score_tables(
    table: pl.DataFrame, targets: pl.DataFrame, factors_dir: str | os.PathLike[str], *, model: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None, damping: float | str | None = "default",
    query_rank: int | None = None, tfidf_top: int | None = None, batch_size: int = 4, max_length: int | None = None,
    device: str = "cpu", normalize: str = "none", query_batch_size: int | None = 8,
) -> Any:
    """Scores (targets × candidates, uids on both axes) with factors from :func:`fit_table`.

    Args:
        model, checkpoint: default to the ones recorded in the factors folder.
        damping: ``"default"`` (the factors' setting: heuristic 0.1 × mean eigenvalue), ``None`` /
            ``"heuristic"`` or an absolute float.
        query_rank: rank of the preconditioned query gradients (None = full rank).
        tfidf_top: score only each target's top-k candidates by TF-IDF (others NaN).
        max_length: defaults to the one used at fit time.
        query_batch_size: targets preconditioned at a time.

    Raises:
        SchemaError: targets without responses, factors fitted on another model.
    """
    from curate.influence.curvature import Curvature
    from curate.influence.scores import pairwise_scores
    from curate.influence.task import CausalLMTask
    from curate.influence.tfidf import tfidf_topk

    curv = Curvature.from_folder(factors_dir)
    if damping != "default":
        curv.damping = damping
        curv.damping_of(curv.names[0])  # validates
    model = model if model is not None else curv.extra.get("model", "default")
    checkpoint = checkpoint if checkpoint is not None else curv.extra.get("checkpoint")
    max_length = max_length if max_length is not None else int(curv.extra.get("max_length", 256))
    if tfidf_top is not None and not (isinstance(tfidf_top, int) and tfidf_top >= 1):
        raise ParameterError(f"The 'tfidf_top' parameter of score_tables must be an integer >= 1. Got {tfidf_top!r}.")
    lm, tok = load_model(model, checkpoint, device=device)
    check_model(curv, lm, where=str(factors_dir))
    queries = _encode(targets, tok, max_length, "target")
    train = _encode(table, tok, max_length, "candidate")
    cand = None
    if tfidf_top is not None:
        cand = tfidf_topk(texts(targets), texts(table), min(tfidf_top, table.height), table["uid"].to_list())
    s = pairwise_scores(curv, lm, CausalLMTask(tok.pad_token_id), queries, train,
                        query_uids=[e.uid for e in queries], train_uids=[e.uid for e in train],
                        batch_size=batch_size, query_rank=query_rank, candidates=cand, normalize=normalize,
                        query_batch_size=query_batch_size)
    s.meta.update({"model": str(model), "checkpoint": checkpoint, "max_length": max_length, "tfidf_top": tfidf_top,
                   "factors": str(factors_dir), "n_fit": curv.n_seq})
    return s


def aggregates_frame(scores: Any) -> pl.DataFrame:
    """Per candidate: uid, mean / max / min over targets (NaN pairs ignored) and how many were scored."""
    agg = scores.aggregates()
    n_scored = np.isfinite(scores.values).sum(0)
    return pl.DataFrame({"uid": list(scores.train_uids), "mean": agg["mean"], "max": agg["max"], "min": agg["min"],
                         "n_scored": n_scored.astype(np.int64)},
                        schema={"uid": pl.Utf8, "mean": pl.Float64, "max": pl.Float64, "min": pl.Float64,
                                "n_scored": pl.Int64})


def save_scores(scores: Any, out_dir: str | os.PathLike[str]) -> Path:
    """Write a score folder atomically (temp folder, then rename).

    Contents: the (N candidates × M targets) feature set ``values.npy`` / ``uids.parquet`` /
    ``meta.json`` (meta ``target_uids`` names the columns; ``curate select --scores DIR`` reads it),
    ``targets.parquet`` (column order), ``aggregates.parquet`` (per-candidate mean / max / min).
    """
    from curate.io.writers import atomic_dir

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        inner = scores.to_feature_set("scores").save(tmp / "fs")
        for f in inner.iterdir():
            os.replace(f, tmp / f.name)
        inner.rmdir()
        pl.DataFrame({"uid": list(scores.query_uids)}, schema={"uid": pl.Utf8}).write_parquet(tmp / "targets.parquet")
        aggregates_frame(scores).write_parquet(tmp / "aggregates.parquet")
    return out
