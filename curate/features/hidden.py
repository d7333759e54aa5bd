"""Causal-LM hidden-state embeddings: the RDS+ representation (``model="lm"`` / ``"lm:<folder>"``).

RDS+ (Ivison et al., 2025, "Large-Scale Data Selection for Instruction Tuning", arXiv 2503.01807)
represents each example by a *position-weighted mean pool of the final-layer hidden states* of the
causal LM being tuned and selects pool rows by cosine similarity to target rows. The position
weighting is the weighted-mean pooling of SGPT (Muennighoff, 2022, "SGPT: GPT Sentence Embeddings
for Semantic Search", arXiv 2202.08904): with the T non-pad tokens of a text at positions
t = 1..T, the pooled vector is ``sum_t w_t h_t`` with ``w_t = t / sum_s s``, so later tokens, which
have seen more of the text through causal attention, count more. ``"mean"`` (uniform weights) and
``"last"`` (the hidden state of the last non-pad token) are offered for comparison.

:class:`CausalLMEmbedder` plugs into :class:`curate.features.embedders.Embedder`, which dedupes texts,
batches them by token length, restores input order and L2-normalises (cosine similarity then is a
dot product). Its feature sets are named ``hidden/<field>`` so they never collide with the
sentence-transformer ``embed/<field>`` sets of the same field.

Deviations from the paper (and why):

- The default model is curate's packaged SmolLM2-135M-Instruct (dequantised Q4_1, see
  :mod:`curate.features.lm`), not the Llama 2 / Tulu models of the paper; any local HF causal-LM
  folder can be named instead (``"lm:<folder>"``).
- The text is embedded as plain text (``prompt+response`` by default, the field chosen by the
  caller), tokenised by calling the tokenizer normally (its own BOS/EOS behaviour), with no chat
  template; the paper formats examples in the Tulu chat format.
- Texts are cut to ``max_length`` tokens (default 512) from the right, keeping the start.
- Padding never changes a vector: pooling uses the attention mask and position ids count the
  non-pad tokens. Batches are always padded on the right, whatever ``tokenizer.padding_side``
  says: with left padding the pad positions' attention rows are fully masked, which eager
  attention in transformers 5 turns into NaN states that then leak into the real tokens through
  ``0 * NaN`` in the next layer's value product. :func:`pool_hidden_states` itself accepts either
  side.
- On CUDA the model runs in bfloat16 by default (float32 on CPU); pooling is always done in
  float32 (float64 when the model runs in float64).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import numpy as np

from curate._lazy import require
from curate.errors import param_error
from curate.features.embedders import Embedder, _fingerprint, _resolve_device

POOLINGS = ("weighted_mean", "mean", "last")
DEFAULT_POOLING = "weighted_mean"
DEFAULT_MAX_LENGTH = 512
LM_DTYPES = ("auto", "float32", "float64", "float16", "bfloat16")


def check_pooling(owner: str, pooling: Any, max_length: Any) -> None:
    """Raise a ParameterError (naming ``owner``) for an unknown pooling or a bad ``max_length``."""
    if pooling not in POOLINGS:
        raise param_error(owner, "pooling", f"one of {POOLINGS}", pooling)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise param_error(owner, "max_length", "an integer >= 1", max_length)


def pool_hidden_states(hidden: Any, attention_mask: Any, pooling: str = DEFAULT_POOLING) -> Any:
    """Pool token states (B, L, H) over the non-pad positions of ``attention_mask`` (B, L).

    ``weighted_mean``: weights ``t / sum_s s`` over the non-pad tokens counted t = 1..T from the
    left (SGPT, Muennighoff 2022; RDS+, Ivison et al. 2025); ``mean``: uniform weights; ``last``:
    the state of the last non-pad token. Works for left, right or mixed padding. Values at pad
    positions are never read (they may be anything, NaN included). Rows without any non-pad token
    pool to zeros. Computes in float32, or float64 when ``hidden`` is float64.
    """
    if pooling not in POOLINGS:
        raise param_error("pool_hidden_states", "pooling", f"one of {POOLINGS}", pooling)
    torch = require("torch", "causal-LM embeddings")
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    keep = attention_mask.to(device=hidden.device).bool()
    h = torch.where(keep.unsqueeze(-1), hidden.to(dtype), torch.zeros((), dtype=dtype, device=hidden.device))
    if pooling == "last":
        length = keep.shape[1]
        last = (length - 1) - keep.flip(1).to(torch.int64).argmax(dim=1)  # index of the last True per row
        out = h[torch.arange(h.shape[0], device=h.device), last]
        return torch.where(keep.any(dim=1, keepdim=True), out, torch.zeros((), dtype=dtype, device=h.device))
    if pooling == "weighted_mean":
        w = (keep.to(torch.int64).cumsum(dim=1) * keep).to(dtype)  # 1..T on the non-pad tokens, 0 on pads
    else:
        w = keep.to(dtype)
    total = w.sum(dim=1, keepdim=True)
    return (h * w.unsqueeze(-1)).sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))


def _state_fingerprint(model: Any) -> str:
    """Hash of an in-memory model's config and parameter bytes (identity of a loaded model)."""
    h = hashlib.blake2b(digest_size=8)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        h.update(flat.view(require("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


class CausalLMEmbedder(Embedder):
    """Pooled final-layer hidden states of a causal LM (RDS+, Ivison et al. 2025).

    Args:
        model: ``"default"`` (the packaged SmolLM2-135M-Instruct), a local Hugging Face causal-LM
            folder, a pinned Hub id ``"org/name@rev"`` (labelled ``org/name@<resolved commit>``), or an already-loaded ``(model, tokenizer)`` pair (used as is, where it lives).
        pooling: ``"weighted_mean"`` (default; SGPT position weights), ``"mean"`` or ``"last"``.
        max_length: tokens kept per text, from the start (default 512).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``. For a loaded pair it must
            be ``"auto"`` or the device the model already is on.
        dtype: compute dtype for a model loaded here: ``"auto"`` (bfloat16 on CUDA, float32 on
            CPU), ``"float32"``, ``"float64"``, ``"float16"`` or ``"bfloat16"``; a loaded pair keeps
            its own.
        attn_implementation: attention kernel for a model loaded here (``"sdpa"`` by default).
        label: name used in :attr:`model_id` instead of the folder path.

    ``model_id`` is ``<label or folder>#<fingerprint>;pooling=<p>;max_length=<n>``, where the
    fingerprint covers the folder's config and weight-file sizes (for a loaded pair: its config and
    every parameter's bytes), so cached features of another model, pooling or length never match.

    Raises:
        ParameterError: bad pooling, max_length, device or dtype.
        FileNotFoundError: the folder is not a local HF model folder.
    """

    feature_prefix = "hidden"

    def __init__(
        self,
        model: str | os.PathLike[str] | tuple[Any, Any] = "default",
        *,
        pooling: str = DEFAULT_POOLING,
        max_length: int = DEFAULT_MAX_LENGTH,
        device: str = "auto",
        dtype: str = "auto",
        attn_implementation: str | None = "sdpa",
        label: str | None = None,
    ) -> None:
        check_pooling("CausalLMEmbedder", pooling, max_length)
        if dtype not in LM_DTYPES:
            raise param_error("CausalLMEmbedder", "dtype", f"one of {LM_DTYPES}", dtype)
        torch = require("torch", "causal-LM embeddings")
        self._torch = torch
        self.pooling = pooling
        self.max_length = int(max_length)
        if isinstance(model, tuple):
            if len(model) != 2:
                raise param_error("CausalLMEmbedder", "model", "a folder, 'default' or a (model, tokenizer) pair", model)
            self.model, self.tokenizer = model
            param = next(self.model.parameters())
            here = param.device.type
            if device not in ("auto", here):
                raise param_error("CausalLMEmbedder", "device", f"'auto' or {here!r} (where the given model is)", device)
            if dtype not in ("auto", str(param.dtype).removeprefix("torch.")):
                raise param_error("CausalLMEmbedder", "dtype", "'auto' for a loaded model (it keeps its dtype)", dtype)
            self.device = here
            self.dtype = str(param.dtype).removeprefix("torch.")
            name = label or getattr(getattr(self.model, "config", None), "_name_or_path", "") or type(self.model).__name__
            identity = f"{name}#{_state_fingerprint(self.model)}"
        else:
            from curate.features.lm import GGUF_DIST, load_causal_lm, resolve_hub_model, resolve_model_path

            self.device = _resolve_device(device, torch)
            self.dtype = ("bfloat16" if self.device == "cuda" else "float32") if dtype == "auto" else dtype
            hub = resolve_hub_model(model)
            path = hub[0] if hub is not None else resolve_model_path(model)
            if label is None and hub is not None:
                label = hub[1]  # the resolved commit, not the movable revision the user typed
            if label is None and str(model) == "default":
                try:
                    label = f"SmolLM2-135M-Instruct({GGUF_DIST}=={dist_version(GGUF_DIST)})"
                except PackageNotFoundError:  # resolve_model_path already found the file some other way
                    label = "SmolLM2-135M-Instruct"
            self.model, self.tokenizer = load_causal_lm(path, device=self.device, dtype=self.dtype,
                                                        attn_implementation=attn_implementation)
            identity = f"{label or Path(path).resolve()}#{_fingerprint(Path(path))}"
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.dim = int(text_config.hidden_size)
        self.model_id = f"{identity};pooling={pooling};max_length={self.max_length}"
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self._pad_id = int(pad) if pad is not None else 0
        base = getattr(self.model, "base_model", None)
        self._base = base if base is not None and base is not self.model else None

    def cache_params(self) -> dict[str, Any]:
        """Pooling and length: stored in the feature set's meta and compared on cache lookups."""
        return {"pooling": self.pooling, "max_length": self.max_length}

    def _prepare(self, texts: list[str]) -> tuple[np.ndarray, Any]:
        tok = self.tokenizer
        if getattr(tok, "truncation_side", "right") == "right":
            enc = tok(texts, truncation=True, max_length=self.max_length)
            ids = [list(x) for x in enc["input_ids"]]
        else:  # keep the start whatever the tokenizer's own truncation side
            ids = [list(x)[: self.max_length] for x in tok(texts)["input_ids"]]
        return np.array([len(x) for x in ids], dtype=np.int64), ids

    def _forward(self, input_ids: Any, mask: Any) -> Any:
        """Final-layer hidden states (B, L, H): the base model's ``last_hidden_state`` (skips the LM
        head and its (B, L, vocab) logits) or, failing that, ``hidden_states[-1]`` of the full model."""
        torch = self._torch
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)  # positions count non-pad tokens only
        if self._base is not None:
            fn = self._base.forward
            extra = {k: v for k, v in (("position_ids", position_ids), ("use_cache", False)) if _accepts(fn, k)}
            out = self._base(**kwargs, **extra)
            hidden = getattr(out, "last_hidden_state", None)
            if isinstance(hidden, torch.Tensor):
                return hidden
        fn = self.model.forward
        extra = {k: v for k, v in (("position_ids", position_ids), ("use_cache", False)) if _accepts(fn, k)}
        return self.model(**kwargs, **extra, output_hidden_states=True).hidden_states[-1]

    def _encode_batch(self, state: Any, rows: np.ndarray) -> np.ndarray:
        torch = self._torch
        seqs = [state[i] for i in rows.tolist()]
        out_dtype = np.float64 if self.dtype == "float64" else np.float32
        out = np.zeros((len(seqs), self.dim), dtype=out_dtype)
        live = [r for r, s in enumerate(seqs) if s]  # empty texts (no tokens) pool to zero vectors
        if not live:
            return out
        width = max(len(seqs[r]) for r in live)
        ids = torch.full((len(live), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(live), width), dtype=torch.long)
        for b, r in enumerate(live):  # right padding always (see the module docstring)
            ids[b, : len(seqs[r])] = torch.tensor(seqs[r], dtype=torch.long)
            mask[b, : len(seqs[r])] = 1
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            pooled = pool_hidden_states(self._forward(ids, mask), mask, self.pooling)
        out[live] = pooled.cpu().numpy()
        return out
