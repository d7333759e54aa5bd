"""Decontamination against evaluation (target) sets: n-gram overlap and embedding similarity.

Method: n-gram overlap as in GPT-3 (Brown et al., 2020, appendix C: 13-grams of normalised
tokens) and the Llama 2 / OLMo-style decontamination tools; embedding similarity as in
"Rethinking Benchmark and Contamination for Language Models with Rephrased Samples"
(Yang et al., 2023), which shows rephrased test items escape n-gram checks.

Where we deviate and why:

- A target with fewer than ``ngram`` tokens (most chat benchmarks' questions: Vicuna-bench's
  shortest has 8) is indexed as one gram of all its tokens, as GPT-3 did for short items;
  targets shorter than ``min_tokens`` are skipped (a 3-word target would match everything) and
  counted in the stats.
- The index is a sorted array of 64-bit gram hashes per gram length (a set, exact up to hash
  collisions, no Bloom-filter false positives) saved with :meth:`NgramIndex.save` and reused for
  new data (``index_path``).
- Both the prompt and the response of every row are checked; the reason names the field, the
  first matching n-gram and the target uid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate.curation._common import TokenHasher, window_hashes, word_tokens
from curate.errors import SchemaError, param_error
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.schema import TEXT_FIELDS, texts

INDEX_VERSION = 1


@dataclass
class NgramMatch:
    """One contaminated text: which target, which gram, how many grams matched."""

    target_uid: str
    gram: str
    n_matches: int


class NgramIndex:
    """A saved set of target n-grams: per gram length, sorted hashes and the target each came from.

    Build with :meth:`build`, query with :meth:`match`, persist with :meth:`save` / :meth:`load`.
    """

    def __init__(self, ngram: int, min_tokens: int, target_uids: list[str], tables: dict[int, tuple[np.ndarray, np.ndarray]],
                 n_skipped: int = 0) -> None:
        self.ngram, self.min_tokens = ngram, min_tokens
        self.target_uids = target_uids
        self.tables = tables  # length -> (sorted hashes uint64, target index int64)
        self.n_skipped = n_skipped
        self._hasher = TokenHasher()

    @classmethod
    def build(cls, target_texts: Sequence[str], target_uids: Sequence[str], *, ngram: int = 13, min_tokens: int = 5) -> NgramIndex:
        """Index the grams of ``target_texts`` (one uid per text; a uid may repeat for several fields)."""
        hasher = TokenHasher()
        per_len: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        skipped = 0
        for t, text in enumerate(target_texts):
            units = hasher(word_tokens(text))
            if len(units) < min_tokens:
                skipped += 1
                continue
            length = min(ngram, len(units))
            h = window_hashes(units, length)
            hs, ts = per_len.setdefault(length, ([], []))
            hs.append(h)
            ts.append(np.full(len(h), t, dtype=np.int64))
        tables = {}
        for length, (hs, ts) in per_len.items():
            h, t = np.concatenate(hs), np.concatenate(ts)
            order = np.lexsort((t, h))  # by hash, then the earliest target
            h, t = h[order], t[order]
            first = np.ones(len(h), dtype=bool)
            first[1:] = h[1:] != h[:-1]
            tables[length] = (h[first], t[first])
        return cls(ngram, min_tokens, list(target_uids), tables, skipped)

    def match(self, text: str) -> NgramMatch | None:
        """The first gram of ``text`` (in reading order, longest gram length first) found in the index."""
        toks = word_tokens(text)
        units = self._hasher(toks)
        best: tuple[int, int, int] | None = None  # (position, length, target)
        total = 0
        for length in sorted(self.tables, reverse=True):
            keys, tgt = self.tables[length]
            wh = window_hashes(units, length)
            if not len(wh):
                continue
            pos = np.searchsorted(keys, wh)
            pos[pos == len(keys)] = 0
            hit = keys[pos] == wh
            total += int(hit.sum())
            if hit.any():
                k = int(np.argmax(hit))
                if best is None or k < best[0]:
                    best = (k, length, int(tgt[pos[k]]))
        if best is None:
            return None
        k, length, t = best
        return NgramMatch(self.target_uids[t], " ".join(toks[k : k + length]), total)

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the index to ``folder`` (``grams.npz`` + ``index.json``), each file atomically."""
        from curate.io.writers import atomic_path, write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for length, (h, t) in self.tables.items():
            arrays[f"h{length}"], arrays[f"t{length}"] = h, t
        with atomic_path(folder / "grams.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        write_json({"version": INDEX_VERSION, "ngram": self.ngram, "min_tokens": self.min_tokens,
                    "n_skipped": self.n_skipped, "lengths": sorted(self.tables), "target_uids": self.target_uids},
                   folder / "index.json")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> NgramIndex:
        folder = Path(folder)
        meta_path = folder / "index.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no decontamination index in {folder} (index.json missing).")
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != INDEX_VERSION:
            raise SchemaError("unsupported index version.", file=str(meta_path), field="version",
                              expected=str(INDEX_VERSION), found=meta.get("version"))
        with np.load(folder / "grams.npz") as z:
            tables = {int(length): (z[f"h{length}"], z[f"t{length}"]) for length in meta["lengths"]}
        return cls(meta["ngram"], meta["min_tokens"], meta["target_uids"], tables, meta.get("n_skipped", 0))


def target_texts(targets: pl.DataFrame, fields: Sequence[str] = ("prompt",)) -> tuple[list[str], list[str]]:
    """(texts, uids) of the target rows over ``fields`` (empty texts dropped)."""
    out_t: list[str] = []
    out_u: list[str] = []
    uids = targets["uid"].to_list()
    for f in fields:
        for u, t in zip(uids, texts(targets, f)):
            if t.strip():
                out_t.append(t)
                out_u.append(u)
    return out_t, out_u


def ngram_contamination(
    table: pl.DataFrame, index: NgramIndex, *, fields: Sequence[str] = ("prompt", "response")
) -> pl.DataFrame:
    """Check ``fields`` of every row against ``index``.

    Returns ``uid, keep, reason, score, target_uid, matched_field, matched_ngram``; ``score`` is
    the number of matching grams over the fields.
    """
    n = table.height
    keep = np.ones(n, dtype=bool)
    score = np.zeros(n, dtype=np.float64)
    tuid: list[str | None] = [None] * n
    mfield: list[str | None] = [None] * n
    gram: list[str | None] = [None] * n
    for f in fields:
        for i, text in enumerate(texts(table, f)):
            m = index.match(text)
            if m is None:
                continue
            score[i] += m.n_matches
            if keep[i]:
                keep[i] = False
                tuid[i], mfield[i], gram[i] = m.target_uid, f, m.gram
    reasons = ["" if k else f"decontam: {f} shares a {len(g.split())}-gram with target {t}: \"{g}\""
               for k, f, g, t in zip(keep.tolist(), mfield, gram, tuid)]
    return pl.DataFrame({"uid": table["uid"], "keep": keep, "reason": reasons, "score": score,
                         "target_uid": tuid, "matched_field": mfield, "matched_ngram": gram},
                        schema_overrides={"target_uid": pl.Utf8, "matched_field": pl.Utf8, "matched_ngram": pl.Utf8})


def embedding_contamination(
    table: pl.DataFrame, targets: pl.DataFrame, *, threshold: float = 0.9, model: Any = "default",
    fields: Sequence[str] = ("prompt", "response"), target_field: str = "prompt", batch_size: int = 64,
    device: str = "auto",
) -> pl.DataFrame:
    """Flag rows whose ``fields`` embedding has cosine >= ``threshold`` to any target prompt.

    Returns ``uid, keep, reason, score, target_uid, matched_field``; ``score`` is the highest cosine.
    """
    from curate._lazy import require
    from curate.curation.semantic import embed

    faiss = require("faiss", "embedding decontamination")
    t_texts, t_uids = target_texts(targets, (target_field,))
    n = table.height
    best = np.full(n, -1.0)
    best_t: list[str | None] = [None] * n
    best_f: list[str | None] = [None] * n
    if t_texts and n:
        y = embed(t_texts, model=model, batch_size=batch_size, device=device)
        index = faiss.IndexFlatIP(y.shape[1])
        index.add(np.ascontiguousarray(y))
        for f in fields:
            x = embed(texts(table, f), model=model, batch_size=batch_size, device=device)
            sim, idx = index.search(np.ascontiguousarray(x), 1)
            for i in range(n):
                if sim[i, 0] > best[i]:
                    best[i], best_t[i], best_f[i] = float(sim[i, 0]), t_uids[int(idx[i, 0])], f
    keep = best < threshold
    reasons = ["" if k else f"decontam: {f} embedding cosine {s:.3f} to target {t}"
               for k, f, s, t in zip(keep.tolist(), best_f, best.tolist(), best_t)]
    return pl.DataFrame({"uid": table["uid"], "keep": keep, "reason": reasons, "score": best,
                         "target_uid": best_t, "matched_field": best_f},
                        schema_overrides={"target_uid": pl.Utf8, "matched_field": pl.Utf8})


def check_target_paths(paths: Sequence[str | os.PathLike[str]]) -> None:
    """FileNotFoundError naming every target file or folder that does not exist."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"target file(s) not found: {', '.join(missing)}.")


def read_targets(paths: Sequence[str | os.PathLike[str]]) -> pl.DataFrame:
    """Read target files/folders through ``curate.io.read_sources`` (kind ``target``)."""
    check_target_paths(paths)
    from curate.io import read_sources  # type: ignore[attr-defined]

    return read_sources([str(p) for p in paths], kind="target").table


def _check(owner: str, ngram: Any, min_tokens: Any, embedding_threshold: Any, fields: Any) -> None:
    if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1:
        raise param_error(owner, "ngram", "an integer >= 1", ngram)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise param_error(owner, "min_tokens", "an integer >= 1", min_tokens)
    if embedding_threshold is not None and (
        isinstance(embedding_threshold, bool) or not isinstance(embedding_threshold, (int, float))
        or not 0.0 < embedding_threshold <= 1.0
    ):
        raise param_error(owner, "embedding_threshold", "in (0, 1] or null", embedding_threshold)
    if not fields or any(f not in TEXT_FIELDS for f in fields):
        raise param_error(owner, "fields", f"a non-empty list of {TEXT_FIELDS}", fields)


@register_step("decontam")
@dataclass(frozen=True, kw_only=True)
class Decontam:
    """Drop rows whose prompt or response overlaps a target set (n-grams, optionally embeddings).

    Targets come from the recipe's ``targets`` (``ctx.targets``), or from ``targets`` paths read
    with ``curate.io.read_sources``, or from a saved ``index_path`` (n-gram part only).

    Parameters:
        targets: target files/folders (optional when the recipe has targets).
        ngram: gram length in normalised word tokens (default 13).
        min_tokens: targets shorter than this are skipped (default 5).
        fields: row fields checked (default prompt and response).
        target_fields: target fields indexed (default prompt).
        embedding_threshold: also flag rows with cosine >= this to a target prompt (default off).
        model: embedder for the embedding check (default ``default``).
        index_path: folder of a saved n-gram index; built and saved there when absent, and built
            again when the targets (or ``target_fields``) differ from those it was built from.
    """

    path_params: ClassVar[tuple[str, ...]] = ("targets", "index_path")
    path_or_name_params: ClassVar[tuple[str, ...]] = ("model",)
    # an existing index is read (an input, keyed by its content); an absent one is built and saved there
    reused_params: ClassVar[tuple[str, ...]] = ("index_path",)
    targets: tuple[str, ...] | list[str] | None = None
    ngram: int = 13
    min_tokens: int = 5
    fields: tuple[str, ...] | list[str] = ("prompt", "response")
    target_fields: tuple[str, ...] | list[str] = ("prompt",)
    embedding_threshold: float | None = None
    model: str = "default"
    index_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("targets", "fields", "target_fields"):
            v = getattr(self, name)
            if isinstance(v, str):
                object.__setattr__(self, name, (v,))
            elif v is not None:
                object.__setattr__(self, name, tuple(v))
        _check("Decontam", self.ngram, self.min_tokens, self.embedding_threshold, self.fields)
        if not self.target_fields or any(f not in TEXT_FIELDS for f in self.target_fields):
            raise param_error("Decontam", "target_fields", f"a non-empty list of {TEXT_FIELDS}", self.target_fields)
        if self.targets is not None:
            missing = [p for p in self.targets if not Path(p).exists()]
            if missing:
                raise param_error("Decontam", "targets", "existing files or folders", missing)

    def _targets(self, ctx: StepContext) -> pl.DataFrame | None:
        if self.targets:
            return read_targets(list(self.targets))
        return ctx.targets

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        targets = self._targets(ctx)
        index_dir = Path(self.index_path) if self.index_path else None
        t_texts, t_uids = target_texts(targets, self.target_fields) if targets is not None else ([], [])
        index = None
        if index_dir is not None and (index_dir / "index.json").exists():
            index = NgramIndex.load(index_dir)
            if index.ngram != self.ngram or index.min_tokens != self.min_tokens:
                raise param_error("Decontam", "index_path", f"an index built with ngram={self.ngram}, "
                                  f"min_tokens={self.min_tokens}", f"ngram={index.ngram}, min_tokens={index.min_tokens}")
            if targets is not None and index.target_uids != t_uids:  # other targets since it was saved
                ctx.stats["index_rebuilt"] = f"{index_dir}: built from other targets; built again"
                index = None
        if index is None:
            if targets is None:
                raise param_error("Decontam", "targets", "given (or recipe targets, or an existing index_path)", None)
            index = NgramIndex.build(t_texts, t_uids, ngram=self.ngram, min_tokens=self.min_tokens)
            if index_dir is not None:
                index.save(index_dir)
            elif ctx.step_dir is not None:
                index.save(Path(ctx.step_dir) / "ngram_index")
        out = ngram_contamination(table, index, fields=self.fields)
        n_ngram = int((~out["keep"]).sum())
        if self.embedding_threshold is not None:
            if targets is None:
                raise param_error("Decontam", "targets", "given for the embedding check", None)
            emb = embedding_contamination(table, targets, threshold=self.embedding_threshold, model=self.model,
                                          fields=self.fields, device=ctx.device)
            use_emb = out["keep"] & ~emb["keep"]
            out = out.with_columns(
                (out["keep"] & emb["keep"]).alias("keep"),
                pl.when(use_emb).then(emb["reason"]).otherwise(out["reason"]).alias("reason"),
                pl.when(use_emb).then(emb["target_uid"]).otherwise(out["target_uid"]).alias("target_uid"),
                pl.when(use_emb).then(emb["matched_field"]).otherwise(out["matched_field"]).alias("matched_field"),
                emb["score"].alias("embedding_score"),
            )
        ctx.stats["decontam"] = {
            "n_ngram_hits": n_ngram, "n_flagged": int((~out["keep"]).sum()),
            "n_targets_hit": int(out["target_uid"].drop_nulls().n_unique()), "n_targets_skipped_short": index.n_skipped,
        }
        return out
