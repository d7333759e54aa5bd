"""CHES hidden-state features: the per-response state sums and log-probabilities CHES is computed from.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization",
ICLR 2025 (arXiv 2410.08847); see ``docs/methods/ches.md``. The measures and the selector live in
:mod:`curate.selectors.ches`; this module holds tokenisation, the forward passes and the stored feature.

Positions (docs/methods/ches.md §2): ``ids = prompt_ids ⊕ response_ids`` (prompt rendered through the chat
template with the generation prompt; response content tokenised alone, EOS appended when ``append_eos``); the
R states at positions P-1 … P+R-2 are captured with a forward pre-hook on ``model.get_output_embeddings()``
and cast to float64 before summing (docs/methods/ches.md §3). The same forward pass yields the response
log-probability Σ_t log π(y_t | x, y<t) (used by :mod:`curate.preference.diagnostics` for the reference
margin), so one pass per response serves both.

Batching and truncation (and where they deviate from the reference code) are described in
:mod:`curate.selectors.ches`.

Stored feature (``ches/states``, float64, one row per pair): values of shape ``(n, 2, d + 2)``; side 0 is
chosen, side 1 rejected; per side ``[count, log-prob sum, hidden-state sum (d)]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.io.store import FeatureSet, FeatureStore, cache_key

FEATURE = "ches/states"
PADDINGS = ("left", "right", "none")
PAIR_PADDINGS = (*PADDINGS, "prefix")


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


def response_text(msgs: Sequence[Mapping[str, str]] | None) -> str:
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
            r = response_ids(tokenizer, response_text(row[name]).strip() and response_text(row[name]),
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
