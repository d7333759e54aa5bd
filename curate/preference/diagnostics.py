"""Preference-pair diagnostics (docs/methods/preference-diagnostics.md §1, §2, §4, §6) and their pipeline steps.

Formulas (ℓ_π(y|x) = Σ_t log π(y_t | x, y<t) over response tokens with the positions of
:mod:`curate.features.ches_states`, so CHES and the margin come from one forward pass; ℓ̄ = ℓ/|y|):

- **Reference margin** (Chen et al., "Preference Learning Algorithms Do Not Learn Preference Rankings",
  arXiv 2405.19534): m = ℓ_ref(y+|x) − ℓ_ref(y−|x), m̄ = ℓ̄_ref(y+|x) − ℓ̄_ref(y−|x), difficulty = −m;
  ranking accuracy RA = mean 1[ℓ(y+) > ℓ(y−)] with ties counted ½ (sum and per-token versions).
- **Length bias**: p_longer = share of pairs with |y+| > |y−| (ties excluded); length-only baseline
  accuracy = max(p_longer, 1 − p_longer); logistic slope of the label on log(|y+|/|y−|) with both
  orientations (x, 1) and (−x, 0) and no intercept (symmetric by construction); per-source breakdown.
  Pair flags: ``length_exploitable`` (|y+|/|y−| ≥ 2, RM margin > 0, relevance(y+) < relevance(y−), when
  an RM and relevances are given) and ``chosen_extends_rejected`` (|y+|/|y−| ≥ 2 and the chosen text
  starts with the rejected text: it is longer and nothing else differs).
- **Annotator agreement** (PandaLM votes in ``annotators``: +1 chosen, −1 rejected, 0 tie):
  ``unanimous`` when every vote is the same non-tie side, ``majority`` when one side has more than half
  the votes, else ``split``; ``agree_fraction`` = (#chosen + ½ #tie) / #votes.
- **RM margin and multi-RM votes** ("Secrets of RLHF Part II", arXiv 2401.06080): d_k = r_k(y+) − r_k(y−);
  d̃_k = d_k / sd_pool(d_k) (not centred); mean μ, spread σ (0 for K = 1), agreement
  a = (#{d_k > 0} + ½ #{d_k = 0}) / K; flag ``incorrect`` if a ≤ 0.2, ``ambiguous`` if not incorrect and
  (|μ| < 0.1 or a < 0.8), else ``clear``; soft label = a. Thresholds are project defaults.
- **IFD** (Li et al., NAACL 2024, arXiv 2308.12032): s(A|Q) = mean −log p(a_t | Q, a<t) (chat template),
  s(A) = mean over the same answer ids with only BOS before them; IFD = s(A|Q)/s(A).

Deviation: a scorer that is a causal LM (not a sequence-classification model) scores a response by its
per-token log-probability ℓ̄ (an implicit-reward judge), not by prompting it for a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import param_error
from curate.features.ches_states import SideIds, ches_features, ches_table, prompt_ids, response_ids, response_stats
from curate.pipeline.registry import register_step
from curate.pipeline.step import StepContext
from curate.selectors.ches import pair_problems
from curate.validation import check_int

AGREEMENT = ("unanimous", "majority", "split")
RM_FLAGS = ("incorrect", "ambiguous", "clear")
ACTIONS = ("annotate", "drop")


# ------------------------------------------------------------------------------ reference margin
def ref_margin(logp_chosen: Any, logp_rejected: Any, len_chosen: Any, len_rejected: Any) -> dict[str, np.ndarray]:
    """margin, margin_per_token, difficulty and ref_ranks_correctly (1, ½ on a tie, 0) per pair."""
    lc, lr = np.asarray(logp_chosen, np.float64), np.asarray(logp_rejected, np.float64)
    nc, nr = np.asarray(len_chosen, np.float64), np.asarray(len_rejected, np.float64)
    m = lc - lr
    with np.errstate(divide="ignore", invalid="ignore"):
        mt = np.where((nc > 0) & (nr > 0), lc / nc - lr / nr, np.nan)
    return {"margin": m, "margin_per_token": mt, "difficulty": -m,
            "ref_ranks_correctly": np.where(m > 0, 1.0, np.where(m == 0, 0.5, 0.0))}


def ranking_accuracy(logp_chosen: Any, logp_rejected: Any, len_chosen: Any = None, len_rejected: Any = None
                     ) -> dict[str, float]:
    """RA of a model on a set: mean 1[ℓ(y+) > ℓ(y−)], ties ½; ``per_token`` uses ℓ̄ when lengths are given."""
    lc, lr = np.asarray(logp_chosen, np.float64), np.asarray(logp_rejected, np.float64)
    if len(lc) == 0:
        return {"sum": float("nan"), "per_token": float("nan"), "n": 0}

    def ra(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))))

    out = {"sum": ra(lc, lr), "n": int(len(lc))}
    if len_chosen is not None and len_rejected is not None:
        out["per_token"] = ra(lc / np.asarray(len_chosen, np.float64), lr / np.asarray(len_rejected, np.float64))
    return out


# ------------------------------------------------------------------------------ length bias
def _logistic_slope(x: np.ndarray) -> float:
    """Slope b of P(label = 1) = σ(b·x) fitted by Newton on (x, 1) and (−x, 0); inf when separable."""
    x = x[np.isfinite(x) & (x != 0)]
    if not len(x):
        return 0.0
    if (x > 0).all() or (x < 0).all():
        return math.copysign(math.inf, float(x[0]))
    xs = np.concatenate([x, -x])
    ys = np.concatenate([np.ones_like(x), np.zeros_like(x)])
    b = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-b * xs))
        g = float(np.sum((ys - p) * xs))
        h = float(np.sum(p * (1 - p) * xs * xs))
        if h <= 0:
            break
        step = g / h
        b += step
        if abs(step) < 1e-12:
            break
    return b


def length_bias(len_chosen: Any, len_rejected: Any, sources: Sequence[Any] | None = None) -> dict[str, Any]:
    """Dataset-level length bias: p_longer, baseline_accuracy, logistic slope, n_pairs, per-source."""
    lc, lr = np.asarray(len_chosen, np.float64), np.asarray(len_rejected, np.float64)

    def one(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        ok = (a > 0) & (b > 0)
        a, b = a[ok], b[ok]
        ne = a != b
        p = float(np.mean(a[ne] > b[ne])) if ne.any() else float("nan")
        return {"n_pairs": int(len(a)), "n_ties": int((~ne).sum()), "p_longer": p,
                "baseline_accuracy": max(p, 1 - p) if ne.any() else float("nan"),
                "logistic_slope": _logistic_slope(np.log(a / b)) if len(a) else 0.0}

    out = one(lc, lr)
    if sources is not None:
        src = np.asarray([str(s) for s in sources], dtype=object)
        out["per_source"] = {s: one(lc[src == s], lr[src == s]) for s in sorted(set(src.tolist()))}
    return out


def length_flags(chosen_text: Sequence[str], rejected_text: Sequence[str], len_chosen: Any, len_rejected: Any,
                 rm_margin: Any = None, relevance_chosen: Any = None, relevance_rejected: Any = None,
                 ratio: float = 2.0) -> list[str]:
    """Per pair: ``length_exploitable``, ``chosen_extends_rejected`` or ``""`` (see the module docstring)."""
    lc, lr = np.asarray(len_chosen, np.float64), np.asarray(len_rejected, np.float64)
    out = []
    for i, (c, r) in enumerate(zip(chosen_text, rejected_text, strict=True)):
        long = lr[i] > 0 and lc[i] / lr[i] >= ratio
        if long and rm_margin is not None and relevance_chosen is not None and relevance_rejected is not None \
                and rm_margin[i] > 0 and relevance_chosen[i] < relevance_rejected[i]:
            out.append("length_exploitable")
        elif long and r.strip() and c.strip().startswith(r.strip()):
            out.append("chosen_extends_rejected")
        else:
            out.append("")
    return out


# ------------------------------------------------------------------------------ annotator agreement
def annotator_agreement(votes: Sequence[int] | None) -> tuple[str | None, float]:
    """(``unanimous`` | ``majority`` | ``split``, agree_fraction) of votes (+1 chosen, −1 rejected, 0 tie);
    (None, NaN) without votes."""
    if votes is None or len(votes) == 0:
        return None, float("nan")
    v = np.asarray(list(votes), dtype=np.int64)
    pos, neg = int((v > 0).sum()), int((v < 0).sum())
    frac = (pos + 0.5 * (len(v) - pos - neg)) / len(v)
    if pos == len(v) or neg == len(v):
        return "unanimous", frac
    if max(pos, neg) * 2 > len(v):
        return "majority", frac
    return "split", frac


# ------------------------------------------------------------------------------ reward-model votes
def rm_votes(d: Any, *, incorrect_at: float = 0.2, min_strength: float = 0.1, min_agree: float = 0.8
             ) -> dict[str, np.ndarray]:
    """Vote strength of K reward models from margins ``d`` (n, K) (or (n,) for K = 1).

    Returns mean, std, agree, flag (``incorrect`` | ``ambiguous`` | ``clear``) and soft_label per pair.
    Rescaling one RM's scores by a positive factor changes nothing (per-RM scaling by its pool sd).
    """
    d = np.asarray(d, dtype=np.float64)
    d = d[:, None] if d.ndim == 1 else d
    sd = d.std(axis=0)
    sd = np.where(sd < 1e-12, 1.0, sd)
    dt = d / sd
    mean = dt.mean(axis=1)
    std = dt.std(axis=1) if d.shape[1] > 1 else np.zeros(len(d))
    agree = ((d > 0).sum(1) + 0.5 * (d == 0).sum(1)) / d.shape[1]
    incorrect = agree <= incorrect_at
    ambiguous = ~incorrect & ((np.abs(mean) < min_strength) | (agree < min_agree))
    flag = np.where(incorrect, "incorrect", np.where(ambiguous, "ambiguous", "clear")).astype(object)
    return {"mean": mean, "std": std, "agree": agree, "flag": flag, "soft_label": agree}


def reward_scores(table: pl.DataFrame, scorer: str, *, batch_size: int = 8, device: str = "cpu",
                  max_length: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(r(x, y+), r(x, y−)) per pair from a local scorer folder.

    A sequence-classification model scores the chat-template rendering of prompt + response (logit 0);
    a causal LM scores by per-token log-probability ℓ̄ (see the module docstring).
    """
    tr = require("transformers", "reward-model scores")
    torch = require("torch", "reward-model scores")
    from curate.features.lm import resolve_model_path

    path = resolve_model_path(scorer)
    cfg = tr.AutoConfig.from_pretrained(str(path), local_files_only=True)
    archs = " ".join(getattr(cfg, "architectures", None) or [])
    tok = tr.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if "SequenceClassification" not in archs:
        from curate.features.lm import load_causal_lm

        lm, tok = load_causal_lm(str(path), device=device)
        fs = ches_features(table, model=lm, tokenizer=tok, max_length=max_length, batch_size=batch_size)
        cols = ches_table(fs.align(table["uid"]))
        with np.errstate(divide="ignore", invalid="ignore"):
            return cols["logp_chosen"] / cols["len_chosen"], cols["logp_rejected"] / cols["len_rejected"]
    model = tr.AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True).to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    out = []
    for side in ("chosen", "rejected"):
        texts = []
        for row in table.select("prompt", side).iter_rows(named=True):
            msgs = [dict(m) for m in (row["prompt"] or []) + (row[side] or [])]
            if getattr(tok, "chat_template", None):
                texts.append(tok.apply_chat_template(msgs, tokenize=False))
            else:
                texts.append("\n\n".join(m["content"] for m in msgs))
        scores = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            with torch.no_grad():
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            scores.append(logits[:, 0].double().cpu().numpy())
        out.append(np.concatenate(scores) if scores else np.zeros(0))
    return out[0], out[1]


# ------------------------------------------------------------------------------ IFD
def ifd_scores(table: pl.DataFrame, model: Any, tokenizer: Any, *, append_eos: bool = True, max_length: int = 1024,
               batch_size: int = 8, padding: str = "left") -> dict[str, np.ndarray]:
    """loss_cond, loss_uncond and ifd per row (sft: last assistant turn given everything before it;
    preference: chosen given the prompt). Rows without answer tokens get NaN."""
    from curate.schema import split_prompt_response

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    cond, uncond = [], []
    for row in table.iter_rows(named=True):
        head, tail = split_prompt_response(row)
        ans = response_ids(tokenizer, "\n\n".join(m["content"] for m in tail).strip() and
                           "\n\n".join(m["content"] for m in tail), append_eos=append_eos)
        p = prompt_ids(tokenizer, head) if head else [bos]
        a = ans[: max(0, max_length - min(len(p), max_length // 2))]  # identical answer cut in both conditions
        p = p[len(p) - min(len(p), max_length - len(a)):]
        cond.append(SideIds(p, a))
        uncond.append(SideIds([bos], a))
    st_c = response_stats(model, cond, batch_size=batch_size, padding=padding, pad_token_id=tokenizer.pad_token_id)
    st_u = response_stats(model, uncond, batch_size=batch_size, padding=padding, pad_token_id=tokenizer.pad_token_id)
    with np.errstate(divide="ignore", invalid="ignore"):
        lc = np.where(st_c.counts > 0, -st_c.logps / st_c.counts, np.nan)
        lu = np.where(st_u.counts > 0, -st_u.logps / st_u.counts, np.nan)
        return {"loss_cond": lc, "loss_uncond": lu, "ifd": lc / lu, "n_answer": st_c.counts}


# ------------------------------------------------------------------------------ table-level API
@dataclass
class Diagnosis:
    """Per-pair columns (``frame``: uid + diagnostic columns) and a dataset summary."""

    frame: pl.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def diagnose_pairs(table: pl.DataFrame, states: Any | None = None, *, rm_margins: Any = None,
                   hard_quantile: float = 0.1, sources: Sequence[Any] | None = None) -> Diagnosis:
    """Diagnostic columns of preference rows from ``ches/states`` values (aligned to ``table``) and optional
    RM margins (n, K). Columns: margin, margin_per_token, difficulty, ref_ranks_correctly, hard_to_learn,
    len_chosen, len_rejected, length_flag, agreement, agree_fraction and, with RMs, rm_mean, rm_std,
    rm_agree, rm_flag, rm_soft_label."""
    from curate.schema import texts

    n = table.height
    cols: dict[str, Any] = {"uid": table["uid"].to_list()}
    summary: dict[str, Any] = {"n_pairs": n}
    if states is not None:
        st = ches_table(states)
        rm = ref_margin(st["logp_chosen"], st["logp_rejected"], st["len_chosen"], st["len_rejected"])
        cols.update(rm)
        diff = rm["difficulty"]
        cut = float(np.quantile(diff, 1 - hard_quantile)) if n else math.inf
        top = max(1, math.ceil(hard_quantile * n - 1e-9)) if n and hard_quantile > 0 else 0
        hard = np.zeros(n, dtype=bool)
        hard[np.lexsort((np.asarray(table["uid"].to_list()), -diff))[:top]] = True
        cols["hard_to_learn"] = hard
        cols["len_chosen"] = st["len_chosen"].astype(np.int64)
        cols["len_rejected"] = st["len_rejected"].astype(np.int64)
        summary["ranking_accuracy"] = ranking_accuracy(st["logp_chosen"], st["logp_rejected"], st["len_chosen"],
                                                       st["len_rejected"])
        summary["length_bias"] = length_bias(st["len_chosen"], st["len_rejected"], sources)
        summary["difficulty_cut"] = cut
        summary["n_hard_to_learn"] = int(hard.sum())
        lc, lr = st["len_chosen"], st["len_rejected"]
    else:
        ct, rt = texts(table, "chosen"), texts(table, "rejected")
        lc = np.array([len(t.split()) for t in ct], np.float64)
        lr = np.array([len(t.split()) for t in rt], np.float64)
        cols["len_chosen"], cols["len_rejected"] = lc.astype(np.int64), lr.astype(np.int64)
        summary["length_bias"] = length_bias(lc, lr, sources)
        summary["length_unit"] = "words"
    rmv = None
    if rm_margins is not None:
        rmv = rm_votes(rm_margins)
        cols.update({f"rm_{k}": v for k, v in rmv.items()})
        summary["rm_flags"] = {f: int((rmv["flag"] == f).sum()) for f in RM_FLAGS}
    cols["length_flag"] = length_flags(texts(table, "chosen"), texts(table, "rejected"), lc, lr)
    summary["length_flags"] = {f: cols["length_flag"].count(f) for f in ("length_exploitable", "chosen_extends_rejected")}
    votes = table["annotators"].to_list() if "annotators" in table.columns else [None] * n
    agr = [annotator_agreement(v) for v in votes]
    cols["agreement"] = [a for a, _ in agr]
    cols["agree_fraction"] = [f for _, f in agr]
    summary["agreement"] = {k: sum(1 for a, _ in agr if a == k) for k in AGREEMENT}
    schema_over = {"agreement": pl.Utf8, "length_flag": pl.Utf8}
    if rmv is not None:
        schema_over["rm_flag"] = pl.Utf8
    frame = pl.DataFrame({k: (list(v) if isinstance(v, np.ndarray) and v.dtype == object else v)
                          for k, v in cols.items()}, schema_overrides=schema_over)
    return Diagnosis(frame, summary)


# ------------------------------------------------------------------------------ steps
@register_step("diagnose")
@dataclass(frozen=True, kw_only=True)
class Diagnose:
    """Preference-pair diagnostics: reference margin, difficulty, length bias, annotator agreement, RM votes.

    ``score`` = the reference log-prob margin m (higher = easier). Reuses the ``ches/states`` feature set
    (one forward pass serves CHES and the margin). Non-pairs and pairs with an empty response are routed
    to rejected (``not_a_pair``, ``no_response_tokens``). With ``action: drop`` pairs flagged
    ``incorrect``/``ambiguous`` by the RMs, or ``split`` by annotators, are dropped; the default only
    annotates. See docs/methods/preference-diagnostics.md §1, §2, §4.

    Args:
        model: reference model, ``default`` or a local folder.
        scorers: local reward-model (sequence classification) or causal-LM folders; empty for none.
        action: ``annotate`` (default) | ``drop``.
        hard_quantile: share of pairs with the highest difficulty flagged ``hard_to_learn`` (flag only).
        append_eos, max_length, batch_size, device, dtype: as in the ``ches_states`` step.
    """

    path_or_name_params: ClassVar[tuple[str, ...]] = ("model",)
    model: str = "default"
    scorers: tuple[str, ...] = ()
    action: str = "annotate"
    hard_quantile: float = 0.1
    append_eos: bool = True
    max_length: int | None = 1024
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        owner = "step 'diagnose'"
        if not isinstance(self.model, str) or not self.model:
            raise param_error(owner, "model", "'default' or a local model folder", self.model)
        if isinstance(self.scorers, str) or not all(isinstance(s, str) and s for s in self.scorers):
            raise param_error(owner, "scorers", "a list of local model folders", self.scorers)
        object.__setattr__(self, "scorers", tuple(self.scorers))
        if self.action not in ACTIONS:
            raise param_error(owner, "action", f"one of {list(ACTIONS)}", self.action)
        hq = self.hard_quantile
        if isinstance(hq, bool) or not isinstance(hq, (int, float)) or not 0 <= hq < 1:
            raise param_error(owner, "hard_quantile", "a number in [0, 1)", hq)
        if not isinstance(self.append_eos, bool):
            raise param_error(owner, "append_eos", "True or False", self.append_eos)
        check_int(owner, "max_length", self.max_length, 8, allow_none=True)
        check_int(owner, "batch_size", self.batch_size, 1)
        if self.device not in ("auto", "cpu", "cuda"):
            raise param_error(owner, "device", "one of ['auto', 'cpu', 'cuda']", self.device)
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise param_error(owner, "dtype", "one of ['float32', 'bfloat16', 'float64']", self.dtype)

    def run(self, table: pl.DataFrame, store: Any = None, device: str = "auto", progress: bool = False
            ) -> tuple[pl.DataFrame, dict[str, Any]]:
        """The step's output frame and summary (used by ``apply`` and the CLI)."""
        problems = pair_problems(table)
        ok = pl.Series([p == "" for p in problems])
        sub = table.filter(ok)
        dev = device if self.device == "auto" else self.device
        fs = ches_features(sub, model=self.model, store=store, append_eos=self.append_eos, max_length=self.max_length,
                           batch_size=self.batch_size, device=dev, dtype=self.dtype, progress=progress)
        margins = None
        if self.scorers:
            cols = []
            for s in self.scorers:
                rc, rr = reward_scores(sub, s, batch_size=self.batch_size, device="cpu" if dev == "auto" else dev)
                cols.append(rc - rr)
            margins = np.stack(cols, axis=1)
        diag = diagnose_pairs(sub, fs.align(sub["uid"]), rm_margins=margins, hard_quantile=self.hard_quantile,
                              sources=sub["source"].to_list() if "source" in sub.columns else None)
        f = diag.frame
        keep = np.ones(f.height, dtype=bool)
        reason = np.full(f.height, "", dtype=object)
        if self.action == "drop":
            if "rm_flag" in f.columns:
                bad = np.isin(f["rm_flag"].to_numpy(), ["incorrect", "ambiguous"])
                reason[bad] = ["rm_" + x for x in f["rm_flag"].to_numpy()[bad]]
                keep &= ~bad
            split = (f["agreement"] == "split").fill_null(False).to_numpy()
            reason[split & keep] = "annotators_split"
            keep &= ~split
        f = f.with_columns(pl.Series("keep", keep), pl.Series("reason", reason.tolist(), dtype=pl.Utf8),
                           pl.Series("score", f["margin"].to_numpy()))
        out = table.select("uid").with_columns(pl.Series("__p", problems)).join(f, on="uid", how="left",
                                                                                maintain_order="left")
        out = out.with_columns(pl.col("keep").fill_null(False),
                               pl.when(pl.col("__p") != "").then(pl.col("__p")).otherwise(pl.col("reason"))
                               .alias("reason")).drop("__p")
        diag.summary["n_not_scored"] = int(sum(p != "" for p in problems))
        return out, diag.summary

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        out, summary = self.run(table, ctx.features, ctx.device, ctx.progress)
        ctx.stats["diagnose"] = summary
        return out


@register_step("ifd")
@dataclass(frozen=True, kw_only=True)
class IFD:
    """Instruction-following difficulty IFD = loss(A|Q) / loss(A) (Li et al., NAACL 2024;
    docs/methods/preference-diagnostics.md §6).

    ``score`` = IFD. With ``drop_ge_1`` rows with IFD >= 1 are dropped (``ifd_ge_1``); then, with
    ``keep_top_fraction``, only the ceil(f·N) highest-IFD remaining rows are kept (ties by uid).

    Args:
        model: ``default`` or a local causal-LM folder.
        drop_ge_1: drop rows whose instruction does not help (IFD >= 1).
        keep_top_fraction: keep the highest-IFD share of the rows left, or null for all.
        append_eos, max_length, batch_size, device, dtype: as in ``ches_states``.
    """

    path_or_name_params: ClassVar[tuple[str, ...]] = ("model",)
    model: str = "default"
    drop_ge_1: bool = True
    keep_top_fraction: float | None = None
    append_eos: bool = True
    max_length: int = 1024
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        owner = "step 'ifd'"
        if not isinstance(self.model, str) or not self.model:
            raise param_error(owner, "model", "'default' or a local model folder", self.model)
        if not isinstance(self.drop_ge_1, bool):
            raise param_error(owner, "drop_ge_1", "True or False", self.drop_ge_1)
        f = self.keep_top_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
            raise param_error(owner, "keep_top_fraction", "a number in (0, 1] or null", f)
        if not isinstance(self.append_eos, bool):
            raise param_error(owner, "append_eos", "True or False", self.append_eos)
        check_int(owner, "max_length", self.max_length, 8)
        check_int(owner, "batch_size", self.batch_size, 1)
        if self.device not in ("auto", "cpu", "cuda"):
            raise param_error(owner, "device", "one of ['auto', 'cpu', 'cuda']", self.device)
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise param_error(owner, "dtype", "one of ['float32', 'bfloat16', 'float64']", self.dtype)

    def decide(self, uids: Sequence[str], ifd: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """keep and reason from IFD values (NaN: ``no_response_tokens``)."""
        valid = np.isfinite(ifd)
        keep = valid.copy()
        reason = ["" if v else "no_response_tokens" for v in valid]
        if self.drop_ge_1:
            for i in np.flatnonzero(valid & (ifd >= 1)):
                keep[i], reason[i] = False, "ifd_ge_1"
        if self.keep_top_fraction is not None:
            cand = np.flatnonzero(keep)
            k = math.ceil(self.keep_top_fraction * len(cand) - 1e-9)
            order = cand[np.lexsort((np.asarray(uids, dtype=object)[cand].astype(str), -ifd[cand]))]
            for i in order[k:]:
                keep[i], reason[i] = False, "below_ifd_cutoff"
        return keep, reason

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame:
        from curate.features.lm import load_causal_lm

        dev = ctx.device if self.device == "auto" else self.device
        lm, tok = load_causal_lm(self.model, device=dev, dtype=self.dtype)
        cols = ifd_scores(table, lm, tok, append_eos=self.append_eos, max_length=self.max_length,
                          batch_size=self.batch_size)
        keep, reason = self.decide(table["uid"].to_list(), cols["ifd"])
        ctx.stats["ifd"] = {"n_ge_1": int(np.sum(cols["ifd"] >= 1)), "median": float(np.nanmedian(cols["ifd"]))
                            if np.isfinite(cols["ifd"]).any() else None}
        return pl.DataFrame({"uid": table["uid"], "keep": keep, "reason": reason, "score": cols["ifd"],
                             "loss_cond": cols["loss_cond"], "loss_uncond": cols["loss_uncond"]})


__all__ = [
    "Diagnose", "Diagnosis", "IFD", "annotator_agreement", "diagnose_pairs", "ifd_scores", "length_bias",
    "length_flags", "ranking_accuracy", "ref_margin", "reward_scores", "rm_votes",
]
