"""CHES and LN-CHES: filtering preference pairs that cause likelihood displacement.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization",
ICLR 2025 (arXiv 2410.08847), Definition 2 (CHES) and Appendix A, Definition 3 (LN-CHES); see
``docs/methods/ches.md``. For a prompt x and responses y+ (chosen), y- (rejected), with h the last-layer
hidden state *after the final norm* (the input of the unembedding) at each position that predicts a
response token, s± = Σ_k h_{x,y±<k} and m± = s±/|y±|::

    CHES(x, y+, y-)    = <s+, s- - s+>
    LN-CHES(x, y+, y-) = <m+, m- - m+>

Higher means more similar responses and more expected displacement of log π(y+), so the native quantity
is lower-is-better and ``score = -measure`` (docs/methods/README.md §5).

Positions (docs/methods/ches.md §2): ``ids = prompt_ids ⊕ response_ids`` (prompt rendered through the chat
template with the generation prompt; response content tokenised alone, EOS appended when ``append_eos``); the
R states at positions P-1 … P+R-2 are captured with a forward pre-hook on ``model.get_output_embeddings()``
and cast to float64 before summing (docs/methods/ches.md §3). The same forward pass yields the response
log-probability Σ_t log π(y_t | x, y<t) (used by :mod:`curate.preference.diagnostics` for the reference
margin), so one pass per response serves both.

Where we deviate from the reference code (``princeton-nlp/unintentional-unalignment``):

- Batching: the batched mode is **left padding with explicit** ``position_ids = clamp(cumsum(mask) - 1, 0)``
  (the reference left-pads without position ids, which is only correct for RoPE models). Left padding lets
  every row's response positions sit at the end of the batch, so the LM head runs only on the last
  ``max R + 1`` positions (``logits_to_keep``). ``padding="right"`` (per-row positions, the plain batched
  mode) and ``padding="none"`` (one example at a time, the reference default) give the same numbers
  (tests: 1e-10 in float64). ``padding="prefix"`` (pairs only) runs the shared prompt once per pair
  and both responses as one batch of two on its KV cache: the same numbers (tests: 1e-10), and fewer
  tokens through the model when prompts are long (multi-turn hh-rlhf). :func:`ches_features` picks
  ``prefix`` on CPU and ``left`` on CUDA unless told otherwise.
- Truncation (``max_length``): when prompt + response is too long the response keeps at most
  ``max_length - min(P, max_length // 2)`` tokens and the prompt is cut from the left. The reference
  truncates the concatenated sequence from the right.
- Multi-message responses are joined with blank lines into one response text.

Stored feature (``ches/states``, float64, one row per pair): values of shape ``(n, 2, d + 2)``; side 0 is
chosen, side 1 rejected; per side ``[count, log-prob sum, hidden-state sum (d)]``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.io.store import FeatureSet, FeatureStore, cache_key
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.selectors.base import BaseSelector, Choice, SelectContext, check_choice

FEATURE = "ches/states"
MEASURES = ("ln_ches", "ches")
PADDINGS = ("left", "right", "none")
PAIR_PADDINGS = (*PADDINGS, "prefix")
KEPT_LOW = "kept_low_ches"
DROPPED_HIGH = "dropped_high_ches"
NO_RESPONSE = "no_response_tokens"
IDENTICAL = "identical_responses"


# ----------------------------------------------------------------------------------- pure math
def ches_from_states(hp: np.ndarray, hn: np.ndarray) -> tuple[float, float]:
    """(CHES, LN-CHES) from the response states ``hp`` (R+, d) and ``hn`` (R-, d), in float64.

    CHES = <s+, s- - s+>, LN-CHES = <m+, m- - m+> (Razin et al. 2025, Defs. 2 and 3).
    """
    hp = np.asarray(hp, dtype=np.float64)
    hn = np.asarray(hn, dtype=np.float64)
    sp, sn = hp.sum(0), hn.sum(0)
    mp, mn = sp / len(hp), sn / len(hn)
    return float(sp @ (sn - sp)), float(mp @ (mn - mp))


def ches_from_sums(sp: np.ndarray, sn: np.ndarray, lp: np.ndarray, ln: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised (CHES, LN-CHES) from state sums (n, d) and counts (n,); NaN where a count is <= 0."""
    sp = np.asarray(sp, dtype=np.float64)
    sn = np.asarray(sn, dtype=np.float64)
    lp = np.asarray(lp, dtype=np.float64)
    ln = np.asarray(ln, dtype=np.float64)
    ok = (lp > 0) & (ln > 0)
    ches = np.einsum("nd,nd->n", sp, sn - sp)
    with np.errstate(divide="ignore", invalid="ignore"):
        mp = sp / np.where(ok, lp, 1.0)[:, None]
        mn = sn / np.where(ok, ln, 1.0)[:, None]
    ln_ches = np.einsum("nd,nd->n", mp, mn - mp)
    return np.where(ok, ches, np.nan), np.where(ok, ln_ches, np.nan)


# ----------------------------------------------------------------------------------- tokenisation
@dataclass
class SideIds:
    """Token ids of one (prompt, response) side: the states/log-probs are over ``response``."""

    prompt: list[int]
    response: list[int]
    truncated: bool = False


def _response_text(msgs: Sequence[Mapping[str, str]] | None) -> str:
    return "\n\n".join(m["content"] for m in (msgs or []))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def prompt_ids(tokenizer: Any, prompt: Sequence[Mapping[str, str]]) -> list[int]:
    """The prompt through the chat template with the generation prompt (plain text + newline when the
    tokenizer has no template)."""
    msgs = [dict(m) for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in msgs) + "\n\n"
    return _ids(tokenizer, text)


def response_ids(tokenizer: Any, text: str, *, append_eos: bool = True) -> list[int]:
    """The response content tokenised alone, plus EOS when ``append_eos`` (empty text gives [])."""
    ids = _ids(tokenizer, text)
    if ids and append_eos and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _truncate(p: list[int], r: list[int], max_length: int | None) -> SideIds:
    if max_length is None or len(p) + len(r) <= max_length:
        return SideIds(p, r, False)
    r_keep = min(len(r), max_length - min(len(p), max_length // 2))
    p_keep = min(len(p), max_length - r_keep)
    return SideIds(p[len(p) - p_keep:] if p_keep else [], r[:r_keep], True)


def encode_pairs(table: pl.DataFrame, tokenizer: Any, *, append_eos: bool = True,
                 max_length: int | None = None) -> list[tuple[SideIds, SideIds]]:
    """(chosen side, rejected side) token ids per preference row, in table order.

    Raises:
        SchemaError: a row that is not a preference pair (naming its row and uid).
    """
    out = []
    for i, row in enumerate(table.select("uid", "kind", "prompt", "chosen", "rejected").iter_rows(named=True)):
        if row["kind"] != "preference":
            raise SchemaError("CHES needs preference pairs.", line=i + 1, field="kind", expected="kind 'preference'",
                              found=f"kind {row['kind']!r} (uid {row['uid']})")
        p = prompt_ids(tokenizer, row["prompt"] or [])
        sides = []
        for name in ("chosen", "rejected"):
            r = response_ids(tokenizer, _response_text(row[name]).strip() and _response_text(row[name]),
                             append_eos=append_eos)
            sides.append(_truncate(p, r, max_length))
        out.append((sides[0], sides[1]))
    return out


# ----------------------------------------------------------------------------------- forward passes
@dataclass
class ResponseStats:
    """Per (prompt, response) sequence: hidden-state sums (n, d) float64, counts (n,), log-prob sums (n,)."""

    sums: np.ndarray
    counts: np.ndarray
    logps: np.ndarray


class _Capture:
    """Forward pre-hook on the output embeddings: records the LM head's input (post-final-norm states)."""

    def __init__(self, model: Any) -> None:
        head = model.get_output_embeddings()
        if head is None:
            raise SchemaError("the model has no output embeddings (LM head).", expected="a causal LM", found=type(model).__name__)
        self.value = None
        self.handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        self.value = args[0]

    def close(self) -> None:
        self.handle.remove()


def _hidden_size(model: Any) -> int:
    """Width of the states the LM head reads (its ``in_features``, else ``config.hidden_size``)."""
    head = model.get_output_embeddings()
    return int(head.in_features) if hasattr(head, "in_features") else int(model.config.hidden_size)


def _pad_id(model: Any, pad_token_id: int | None) -> int:
    return int(pad_token_id if pad_token_id is not None else (getattr(model.config, "pad_token_id", None) or 0))


def response_states(model: Any, prompt: Sequence[int], response: Sequence[int]) -> tuple[Any, Any]:
    """(states (R, d) float64, logits (R, V)) at the R positions predicting ``response`` (no padding).

    The reference path (docs/methods/ches.md §2): one example, no padding, full forward.
    """
    torch = require("torch", "CHES")
    ids = list(prompt) + list(response)
    p, r = len(prompt), len(response)
    cap = _Capture(model)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=model.device))
    finally:
        cap.close()
    return cap.value[0, p - 1: p + r - 1].double(), out.logits[0, p - 1: p + r - 1]


def response_stats(model: Any, seqs: Sequence[SideIds], *, batch_size: int = 8, padding: str = "left",
                   pad_token_id: int | None = None, progress: bool = False) -> ResponseStats:
    """Hidden-state sums, counts and response log-probs of every (prompt, response) in ``seqs``.

    Batches are formed in the given order. ``padding``: ``left`` (explicit position ids, LM head only on
    the last ``max R + 1`` positions), ``right`` (per-row positions) or ``none`` (one at a time).
    Sequences with no response tokens (or no prompt token to predict from) get count 0, zero sums and
    log-prob 0. Hidden states are cast to float64 before summing; log-softmax runs in float64.

    Raises:
        SchemaError: a non-finite state sum (naming the sequence index).
    """
    torch = require("torch", "CHES")
    if padding not in PADDINGS:
        raise param_error("response_stats", "padding", f"one of {PADDINGS}", padding)
    n = len(seqs)
    d = _hidden_size(model)
    sums = np.zeros((n, d), dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    logps = np.zeros(n, dtype=np.float64)
    todo = [i for i, s in enumerate(seqs) if len(s.response) > 0 and len(s.prompt) > 0]
    bs = 1 if padding == "none" else max(1, int(batch_size))
    pad = _pad_id(model, pad_token_id)
    dev = model.device
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="hidden states")
    cap = _Capture(model)
    try:
        for start in range(0, len(todo), bs):
            idx = todo[start:start + bs]
            rows = [list(seqs[i].prompt) + list(seqs[i].response) for i in idx]
            lens = [len(r) for r in rows]
            rlen = [len(seqs[i].response) for i in idx]
            t_max = max(lens)
            ids = torch.full((len(idx), t_max), int(pad), dtype=torch.long)
            mask = torch.zeros((len(idx), t_max), dtype=torch.long)
            for b, row in enumerate(rows):
                if padding == "right" or padding == "none":
                    ids[b, : len(row)] = torch.tensor(row)
                    mask[b, : len(row)] = 1
                else:
                    ids[b, t_max - len(row):] = torch.tensor(row)
                    mask[b, t_max - len(row):] = 1
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            attn: Any = mask
            if padding == "left":
                attn = _left_pad_mask(mask, model.dtype)
            kwargs: dict[str, Any] = {"input_ids": ids.to(dev), "attention_mask": attn.to(dev), "position_ids": pos.to(dev)}
            keep = max(rlen) + 1
            if padding == "left":
                kwargs["logits_to_keep"] = keep
            with torch.no_grad():
                out = model(**kwargs)
            h = cap.value
            logits = out.logits
            for b, i in enumerate(idx):
                r = rlen[b]
                if padding == "left":
                    cols = slice(keep - 1 - r, keep - 1)  # local window = the last `keep` positions
                    tgt = ids[b, t_max - r:]
                else:
                    p = lens[b] - r
                    cols = slice(p - 1, p + r - 1)
                    tgt = ids[b, p: p + r]
                hs = h[b, cols].double()
                lp = torch.log_softmax(logits[b, cols].double(), dim=-1)
                sums[i] = hs.sum(0).cpu().numpy()
                counts[i] = r
                logps[i] = float(lp.gather(1, tgt.to(lp.device)[:, None]).sum())
            if bar is not None:
                bar.update(len(idx))
    finally:
        cap.close()
        if bar is not None:
            bar.close()
    bad = ~np.isfinite(sums).all(axis=1) | ~np.isfinite(logps)
    if bad.any():
        raise SchemaError("non-finite hidden-state sum or log-prob.", line=int(np.argmax(bad)) + 1,
                          expected="finite values (run the model in float32 or bf16, not float16)")
    return ResponseStats(sums, counts, logps)


def _left_pad_mask(mask: Any, dtype: Any) -> Any:
    """Additive 4-D causal mask (B, 1, T, T) for a left-padded batch.

    Pad queries may attend to themselves: with a plain 2-D mask their attention row is fully masked,
    which gives NaN states in some attention implementations, and NaN values times a zero attention
    weight poison the real rows.
    """
    torch = require("torch", "CHES")
    t = mask.shape[1]
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & mask[:, None, :].bool()
    allowed = allowed | torch.eye(t, dtype=torch.bool)[None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _shared_prompt_states(model: Any, pairs: Sequence[tuple[SideIds, SideIds]], pad_token_id: int | None,
                          progress: bool = False) -> np.ndarray:
    """``ches/states`` values of pairs whose two sides share their prompt (and have response tokens):
    one forward pass over the prompt, then both responses as a right-padded batch of two on its KV
    cache (one response when both are the same, so identical responses give exactly equal sums)."""
    torch = require("torch", "CHES")
    from curate.features.lm import cache_argument

    cache_arg = cache_argument(model)
    d = _hidden_size(model)
    pad = _pad_id(model, pad_token_id)
    dev = model.device
    out = np.zeros((len(pairs), 2, d + 2), dtype=np.float64)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc="hidden states (shared prompts)")
    cap = _Capture(model)
    try:
        for k, (chosen, rejected) in enumerate(pairs):
            prompt = list(chosen.prompt)
            n_p = len(prompt)
            with torch.no_grad():
                first = model(input_ids=torch.tensor([prompt], device=dev), use_cache=True)
            h_last, logit_last = cap.value[0, -1:], first.logits[0, -1:]
            same = list(chosen.response) == list(rejected.response)
            resp = [list(chosen.response)] if same else [list(chosen.response), list(rejected.response)]
            conts = [r[:-1] for r in resp]  # the inputs that predict response tokens 2..R
            width = max(len(c) for c in conts)
            if width:
                cache = getattr(first, cache_arg)
                if len(resp) == 2:
                    cache.batch_repeat_interleave(2)
                ids = torch.full((len(resp), width), int(pad), dtype=torch.long)
                mask = torch.zeros((len(resp), n_p + width), dtype=torch.long)
                mask[:, :n_p] = 1
                for b, c in enumerate(conts):
                    ids[b, : len(c)] = torch.tensor(c, dtype=torch.long)
                    mask[b, n_p : n_p + len(c)] = 1
                pos = (n_p + torch.arange(width))[None].expand(len(resp), width)
                with torch.no_grad():
                    rest = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                                 use_cache=True, **{cache_arg: cache})
                h_rest, logits_rest = cap.value, rest.logits
            for b, r in enumerate(resp):
                n_r = len(r)
                hs = h_last if n_r == 1 else torch.cat([h_last, h_rest[b, : n_r - 1]])
                lg = logit_last if n_r == 1 else torch.cat([logit_last, logits_rest[b, : n_r - 1]])
                lp = torch.log_softmax(lg.double(), dim=-1)
                tgt = torch.tensor(r, dtype=torch.long, device=lp.device)[:, None]
                row = [n_r, float(lp.gather(1, tgt).sum()), *hs.double().sum(0).cpu().numpy()]
                for side in ((0, 1) if same else (b,)):
                    out[k, side] = row
            if bar is not None:
                bar.update(1)
    finally:
        cap.close()
        if bar is not None:
            bar.close()
    if not np.isfinite(out).all():
        bad = int(np.argmax(~np.isfinite(out).reshape(len(pairs), -1).all(axis=1)))
        raise SchemaError("non-finite hidden-state sum or log-prob.", line=bad + 1,
                          expected="finite values (run the model in float32 or bf16, not float16)")
    return out


def pair_states(model: Any, pairs: Sequence[tuple[SideIds, SideIds]], *, batch_size: int = 8,
                padding: str = "left", pad_token_id: int | None = None, progress: bool = False) -> np.ndarray:
    """The ``ches/states`` layout (n, 2, d + 2) for ``pairs`` (see the module docstring).

    ``padding="prefix"`` shares each pair's prompt (KV cache); pairs whose sides have different
    (truncated) prompts or no response tokens go through the left-padded path.
    """
    if padding not in PAIR_PADDINGS:
        raise param_error("pair_states", "padding", f"one of {PAIR_PADDINGS}", padding)
    if padding == "prefix":
        shared = [k for k, (a, b) in enumerate(pairs)
                  if list(a.prompt) == list(b.prompt) and a.prompt and a.response and b.response]
        other = sorted(set(range(len(pairs))) - set(shared))
        vals = np.zeros((len(pairs), 2, _hidden_size(model) + 2), dtype=np.float64)
        if shared:
            vals[shared] = _shared_prompt_states(model, [pairs[k] for k in shared], pad_token_id, progress)
        if other:
            vals[other] = pair_states(model, [pairs[k] for k in other], batch_size=batch_size, padding="left",
                                      pad_token_id=pad_token_id, progress=progress)
        return vals
    seqs = [s for pair in pairs for s in pair]
    # identical (prompt, response) sequences are computed once, so identical responses give exactly 0
    first: dict[tuple[int, tuple[int, ...]], int] = {}
    src = np.zeros(len(seqs), dtype=np.int64)
    uniq: list[SideIds] = []
    for i, s in enumerate(seqs):
        key = (len(s.prompt), tuple(s.prompt) + tuple(s.response))
        if key not in first:
            first[key] = len(uniq)
            uniq.append(s)
        src[i] = first[key]
    # sort by length so batches pad little; results are placed back by index (order-independent)
    order = sorted(range(len(uniq)), key=lambda i: (len(uniq[i].prompt) + len(uniq[i].response), i))
    st = response_stats(model, [uniq[i] for i in order], batch_size=batch_size, padding=padding,
                        pad_token_id=pad_token_id, progress=progress)
    u = np.zeros((len(uniq), st.sums.shape[1] + 2), dtype=np.float64)
    inv = np.asarray(order, dtype=np.int64)
    u[inv, 0] = st.counts
    u[inv, 1] = st.logps
    u[inv, 2:] = st.sums
    return u[src].reshape(len(pairs), 2, -1)


def ches_features(
    table: pl.DataFrame,
    *,
    model: str | Any = "default",
    tokenizer: Any = None,
    store: FeatureStore | None = None,
    append_eos: bool = True,
    max_length: int | None = 1024,
    batch_size: int = 8,
    padding: str = "auto",
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = False,
) -> FeatureSet:
    """Compute (or load from ``store``) the ``ches/states`` feature set of the preference rows of ``table``.

    Args:
        table: canonical table of preference rows.
        model: ``"default"`` (packaged SmolLM2-135M-Instruct), a local HF folder, or a loaded model (then
            ``tokenizer`` is required).
        tokenizer: the tokenizer of a loaded ``model``.
        store: feature store for caching; the set is recomputed only when its cache key (uids, model,
            append_eos, max_length, dtype) changes.
        append_eos: append EOS to responses (must match the preference trainer); recorded in ``meta``.
        max_length: token cap per (prompt, response) sequence (None: no truncation).
        batch_size: sequences per forward pass.
        padding: ``auto`` (default: ``prefix`` on CPU, ``left`` on CUDA) | ``left`` | ``right`` | ``none`` |
            ``prefix`` (all give the same values).
        device, dtype: for loading a model by name.
        progress: progress bar.
    """
    uids = table["uid"].to_list()
    name = str(model) if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    params = {"model": name, "append_eos": append_eos, "max_length": max_length, "dtype": dtype, "kind": FEATURE}
    key = cache_key(uids, params)
    if store is not None:
        old = store.get(FEATURE, key)
        if old is not None:
            return old
    if isinstance(model, str):
        from curate.features.lm import load_causal_lm

        lm, tok = load_causal_lm(model, device=device, dtype=dtype)
    else:
        if tokenizer is None:
            raise param_error("ches_features", "tokenizer", "given with a loaded model", None)
        lm, tok = model, tokenizer
    pairs = encode_pairs(table, tok, append_eos=append_eos, max_length=max_length)
    if padding == "auto":  # CPU: sharing the prompt saves the most work; GPU: wide batches do
        padding = "left" if getattr(getattr(lm, "device", None), "type", "cpu") == "cuda" else "prefix"
    values = pair_states(lm, pairs, batch_size=batch_size, padding=padding, pad_token_id=tok.pad_token_id,
                         progress=progress)
    meta = {**params, "cache_key": key, "dim": int(values.shape[2] - 2), "layout": "(n, side[chosen, rejected], "
            "[count, logp_sum, state_sum(d)])", "storage_dtype": "float64",
            "n_truncated": int(sum(a.truncated or b.truncated for a, b in pairs))}
    fs = FeatureSet(FEATURE, np.asarray(uids, dtype=object), values, meta)
    if store is not None:
        store.put(fs)
    return fs


def ches_table(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per-pair columns from ``ches/states`` values: ches, ln_ches, len_chosen, len_rejected, logp_chosen,
    logp_rejected (NaN scores where a side has no response tokens)."""
    v = np.asarray(values, dtype=np.float64)
    v = v.reshape(len(v), 2, -1)
    lp, ln = v[:, 0, 0], v[:, 1, 0]
    ches, ln_ches = ches_from_sums(v[:, 0, 2:], v[:, 1, 2:], lp, ln)
    return {"ches": ches, "ln_ches": ln_ches, "len_chosen": lp, "len_rejected": ln,
            "logp_chosen": v[:, 0, 1], "logp_rejected": v[:, 1, 1]}


# ----------------------------------------------------------------------------------- the selector
def _fraction(owner: str, name: str, value: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or not 0.0 < float(value) <= 1.0:
        raise param_error(owner, name, "a number in (0, 1] or None", value)


@dataclass(frozen=True, kw_only=True)
class ChesSelector(BaseSelector):
    """CHES / LN-CHES filter of preference pairs (Razin et al., ICLR 2025): keep the least similar pairs.

    Exactly one mode may be given; with none, the paper preset ``keep_bottom_fraction=0.05`` applies.

    Attributes:
        measure: ``ln_ches`` (default, the paper's filtering measure) or ``ches`` (raw; grows with length).
        keep_bottom_fraction: keep the ceil(f·N) pairs with the lowest measure (paper: 0.05 on LN-CHES).
        drop_top_fraction: drop the ceil(q·N) pairs with the highest measure, keep the rest.
        threshold: keep pairs whose measure is <= threshold.
        keep_window: ``(quantile, n)``: keep n pairs centred on that quantile of the ascending order
            (the paper's §5 percentile subsets).

    The budget is a cap on the kept count (lowest measure first). Ties go to the smaller uid. Pairs
    with no response tokens on a side get ``score = -inf`` and reason ``no_response_tokens``. Extra
    columns: ``ches__ches``, ``ches__ln_ches``, ``ches__len_chosen``, ``ches__len_rejected``.
    """

    name: ClassVar[str] = "ches"
    requires: ClassVar[tuple[str, ...]] = ("ches",)
    default_features: ClassVar[dict[str, str]] = {"ches": FEATURE}
    default_budget: ClassVar[Any] = 1.0
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("measure", "cosine"), ("keep_bottom_fraction", 0.0), ("keep_bottom_fraction", 1.5),
        ("drop_top_fraction", -0.1), ("threshold", float("nan")), ("keep_window", (1.5, 3)),
        ("keep_window", (0.5, 0)),
    )

    measure: str = "ln_ches"
    keep_bottom_fraction: float | None = None
    drop_top_fraction: float | None = None
    threshold: float | None = None
    keep_window: tuple[float, int] | None = None

    def __post_init__(self) -> None:
        check_choice("CHES", "measure", self.measure, MEASURES)
        _fraction("CHES", "keep_bottom_fraction", self.keep_bottom_fraction)
        _fraction("CHES", "drop_top_fraction", self.drop_top_fraction)
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(float(t))):
            raise param_error("CHES", "threshold", "a finite number or None", t)
        w = self.keep_window
        if w is not None:
            ok = isinstance(w, (list, tuple)) and len(w) == 2 and isinstance(w[0], numbers.Real) \
                and not isinstance(w[0], bool) and 0.0 <= float(w[0]) <= 1.0 \
                and isinstance(w[1], numbers.Integral) and not isinstance(w[1], bool) and w[1] >= 1
            if not ok:
                raise param_error("CHES", "keep_window", "(quantile in [0, 1], n >= 1) or None", w)
            object.__setattr__(self, "keep_window", (float(w[0]), int(w[1])))
        given = [k for k in ("keep_bottom_fraction", "drop_top_fraction", "threshold", "keep_window")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise param_error("CHES", given[1], f"None when {given[0]} is given (one mode at a time)",
                              getattr(self, given[1]))

    def fills_budget(self) -> bool:
        return False

    def mode(self) -> tuple[str, Any]:
        """The active mode and its value (the paper preset when none is given)."""
        for k in ("keep_bottom_fraction", "drop_top_fraction", "threshold", "keep_window"):
            if getattr(self, k) is not None:
                return k, getattr(self, k)
        return "keep_bottom_fraction", 0.05

    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        cols = ches_table(ctx.features["ches"])
        measure = cols[self.measure]
        n = ctx.n
        valid = np.isfinite(measure)
        if not np.isfinite(measure[(cols["len_chosen"] > 0) & (cols["len_rejected"] > 0)]).all():
            i = int(np.argmax(~valid & (cols["len_chosen"] > 0) & (cols["len_rejected"] > 0)))
            raise SchemaError("non-finite CHES score.", field=self.measure, expected="finite", found=f"uid {ctx.uids[i]}")
        vidx = np.flatnonzero(valid)
        asc = vidx[np.argsort(measure[vidx], kind="stable")]  # canonical order = uid order, so ties by uid
        nv = len(asc)
        mode, value = self.mode()
        if mode == "keep_bottom_fraction":
            chosen = asc[: math.ceil(value * nv - 1e-9)]
        elif mode == "drop_top_fraction":
            chosen = asc[: nv - math.ceil(value * nv - 1e-9)]
        elif mode == "threshold":
            chosen = asc[measure[asc] <= value]
        else:
            q, m = value
            m = min(m, nv)
            centre = int(round(q * (nv - 1))) if nv else 0
            lo = min(max(0, centre - m // 2), nv - m)
            chosen = asc[lo: lo + m]
        order = chosen[:k]
        reasons = np.full(n, DROPPED_HIGH, dtype=object)
        reasons[order] = KEPT_LOW
        if mode == "keep_window":
            lo_set = set(asc[: lo].tolist())
            for i in range(n):
                if i in lo_set:
                    reasons[i] = "dropped_below_window"
        for i in chosen[k:]:
            reasons[i] = "over_budget_cap"
        reasons[~valid] = NO_RESPONSE
        v = np.asarray(ctx.features["ches"], dtype=np.float64).reshape(n, 2, -1)
        ident = valid & (cols["len_chosen"] == cols["len_rejected"]) & np.all(v[:, 0, 2:] == v[:, 1, 2:], axis=1)
        for i in np.flatnonzero(ident):
            reasons[i] = f"{reasons[i]}:{IDENTICAL}"
        score = np.where(valid, -np.nan_to_num(measure, nan=0.0), -np.inf)
        extra = {"ches__ches": cols["ches"], "ches__ln_ches": cols["ln_ches"],
                 "ches__len_chosen": cols["len_chosen"].astype(np.int64),
                 "ches__len_rejected": cols["len_rejected"].astype(np.int64)}
        finite = measure[valid]
        diag = {"mode": mode, "value": value, "measure": self.measure, "n_scored": int(nv),
                "n_no_response": int((~valid).sum()), "n_identical": int(ident.sum()),
                "measure_quantiles": {str(q): float(np.quantile(finite, q)) for q in (0.0, 0.05, 0.5, 0.95, 1.0)}
                if nv else {}}
        return Choice(order=np.asarray(order, dtype=np.int64), score=score, reasons=reasons, extra=extra,
                      diagnostics=diag)


# ----------------------------------------------------------------------------------- feature step
@register_step("ches_states")
@dataclass(frozen=True, kw_only=True)
class ChesStates:
    """Compute CHES hidden-state sums and response log-probs (feature ``ches/states``) of preference rows.

    Routes non-preference rows and pairs with an empty response to rejected (reasons ``not_a_pair``,
    ``no_response_tokens``); keeps the rest. Razin et al., ICLR 2025 (see ``curate.selectors.ches``).

    Args:
        model: ``default`` (SmolLM2-135M-Instruct) or a local causal-LM folder.
        append_eos: append EOS to responses (match the trainer).
        max_length: token cap per (prompt, response) sequence; null for none.
        batch_size: sequences per forward pass.
        device: ``auto`` | ``cpu`` | ``cuda``.
        dtype: ``float32`` | ``bfloat16`` | ``float64``.
        padding: ``auto`` (``prefix`` on CPU: each prompt once, both responses on its KV cache,
            1.16x the left-padded batches on hh-rlhf; ``left`` batches on CUDA) or any of
            ``left`` | ``right`` | ``none`` | ``prefix``; all give the same values.
    """

    model: str = "default"
    append_eos: bool = True
    max_length: int | None = 1024
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    padding: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise param_error("step 'ches_states'", "model", "'default' or a local model folder", self.model)
        if not isinstance(self.append_eos, bool):
            raise param_error("step 'ches_states'", "append_eos", "True or False", self.append_eos)
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 8):
            raise param_error("step 'ches_states'", "max_length", "an integer >= 8 or null", self.max_length)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise param_error("step 'ches_states'", "batch_size", "an integer >= 1", self.batch_size)
        check_choice("step 'ches_states'", "device", self.device, ("auto", "cpu", "cuda"))
        check_choice("step 'ches_states'", "dtype", self.dtype, ("float32", "bfloat16", "float64"))
        check_choice("step 'ches_states'", "padding", self.padding, ("auto", *PAIR_PADDINGS))

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        reasons = pair_problems(table)
        ok = [r == "" for r in reasons]
        sub = table.filter(pl.Series(ok))
        device = ctx.device if self.device == "auto" else self.device
        fs = ches_features(sub, model=self.model, store=ctx.features, append_eos=self.append_eos,
                           max_length=self.max_length, batch_size=self.batch_size, padding=self.padding, device=device,
                           dtype=self.dtype, progress=ctx.progress)
        ctx.stats["ches_states"] = {"n_pairs": len(fs), "dim": fs.meta.get("dim"),
                                    "n_truncated": fs.meta.get("n_truncated")}
        return pl.DataFrame({"uid": table["uid"], "keep": ok, "reason": reasons},
                            schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8})


def pair_problems(table: pl.DataFrame) -> list[str]:
    """Per row: ``""`` for a usable preference pair, else ``not_a_pair`` or ``no_response_tokens``."""
    out = []
    for row in table.select("kind", "chosen", "rejected").iter_rows(named=True):
        if row["kind"] != "preference":
            out.append("not_a_pair")
        elif not _response_text(row["chosen"]).strip() or not _response_text(row["rejected"]).strip():
            out.append(NO_RESPONSE)
        else:
            out.append("")
    return out


__all__ = [
    "FEATURE", "ChesSelector", "ChesStates", "ResponseStats", "SideIds", "ches_features", "ches_from_states", "ches_from_sums",
    "ches_table", "encode_pairs", "pair_problems", "pair_states", "prompt_ids", "response_ids", "response_states",
    "response_stats",
]
