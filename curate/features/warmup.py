"""LESS warm-up training: a short seeded LoRA fine-tune whose checkpoints feed gradient features.

Xia et al., "LESS: Selecting Influential Data for Targeted Instruction Tuning", ICML 2024, arXiv
2402.04333 (code ``princeton-nlp/LESS``), §4.1 and docs/methods/gradient-features.md §7: LoRA-train the base
model on a seeded random 5% of the pool (at least 200 rows) for 4 epochs, peak lr 2e-5, warm-up ratio
0.03 then linear decay, AdamW, saving adapters and Adam moments after every epoch. The mean learning
rate of each epoch is recorded so :mod:`curate.features.gradients` can weight the checkpoints
(w_c = η̄_c / Σ η̄) and Adam-precondition per-example gradients with the saved moments.

The checkpoint layout written here, and read by gradient features and whitening, is described
and implemented in :mod:`curate.features.checkpoints`.

Deviations (and why):

- CPU preset: batch 16 (paper 128), ``max_length`` 128 (paper 2048), LoRA r=8, α=32 (paper 128/512),
  and by default LoRA only on the top ``lora_layers`` transformer blocks (paper: every block). With
  every lower parameter frozen, back-propagation stops at the lowest adapted block, which roughly
  halves the cost of a training step on SmolLM2-135M (the backward pass otherwise costs twice the
  forward pass). Gradient features computed from these checkpoints track the same adapters.
- The training loss is the HF causal-LM loss of the paper (response tokens averaged over the whole
  batch), computed in micro-batches of similar length and accumulated, so memory stays bounded and
  the result does not depend on ``micro_batch_size`` beyond float round-off.
- Sampling depends only on the set of uids and the seed (uids are sorted before the seeded draw), so
  the same pool in another row order trains on the same rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.features.checkpoints import CKPT_PREFIX, WARMUP_FILE, read_warmup, save_checkpoint, step_checkpoint_dir
from curate.features.lm_batches import LORA_TARGETS, block_index, collate, row_losses
from curate.io.writers import atomic_dir
from curate.pipeline.registry import register_step
from curate.validation import check_float, check_int

SCHEDULES = ("linear", "cosine", "constant")
STREAM_SAMPLE = 0x57A2  # SeedSequence streams: which rows, and each epoch's order
STREAM_SHUFFLE = 0x57A3
@dataclass(frozen=True, kw_only=True)
class WarmupConfig:
    """Hyperparameters of a warm-up run (docs/methods/gradient-features.md §7; defaults are the CPU preset).

    Attributes:
        fraction: share of the pool to train on (LESS: 0.05).
        min_rows: lower bound on the sample size (LESS: 200), capped at the pool size.
        epochs: epochs, one checkpoint after each (LESS: 4).
        lr: peak learning rate (LESS: 2e-5).
        warmup_ratio: share of optimizer steps with a linear ramp from 0 (LESS: 0.03).
        schedule: ``linear`` decay to 0 (LESS scripts), ``cosine`` (LESS paper) or ``constant``.
        batch_size: rows per optimizer step (paper 128; CPU preset 16).
        micro_batch_size: rows per forward/backward pass (gradient accumulation within a step).
        max_length: tokens per row (truncation of docs/methods/gradient-features.md §2).
        lora_r, lora_alpha, lora_dropout: LoRA hyperparameters (dropout only during training).
        lora_targets: module names that get adapters.
        lora_layers: adapt only the top k transformer blocks (None: all blocks).
        weight_decay: AdamW weight decay (HF Trainer default 0).
        seed: seeds the sample, the LoRA initialisation, dropout and each epoch's row order.
    """

    fraction: float = 0.05
    min_rows: int = 200
    epochs: int = 4
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    schedule: str = "linear"
    batch_size: int = 16
    micro_batch_size: int = 4
    max_length: int = 128
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_layers: int | None = 4
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        o = "warmup"
        object.__setattr__(self, "lora_targets", _as_tuple(self.lora_targets))
        check_float(o, "fraction", self.fraction, 0.0, 1.0, lo_open=True)
        check_float(o, "lr", self.lr, 0.0, math.inf, lo_open=True)
        check_float(o, "warmup_ratio", self.warmup_ratio, 0.0, 1.0, hi_open=True)
        check_float(o, "lora_dropout", self.lora_dropout, 0.0, 1.0, hi_open=True)
        check_float(o, "weight_decay", self.weight_decay, 0.0, math.inf)
        for name, lo in (("min_rows", 0), ("epochs", 1), ("batch_size", 1), ("micro_batch_size", 1),
                         ("max_length", 2), ("lora_r", 1), ("lora_alpha", 1), ("seed", 0)):
            check_int(o, name, getattr(self, name), lo)
        check_int(o, "lora_layers", self.lora_layers, 1, allow_none=True)
        if self.schedule not in SCHEDULES:
            raise param_error(o, "schedule", f"one of {SCHEDULES}", self.schedule)
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise param_error(o, "lora_targets", "a non-empty list of module names", self.lora_targets)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


# ------------------------------------------------------------------------------------- pieces
def sample_rows(uids: Sequence[str], fraction: float, min_rows: int, seed: int) -> np.ndarray:
    """Positions of the warm-up sample: max(min_rows, ⌈fraction·N⌉) rows (at most N), seeded.

    Depends only on the set of uids and the seed (not on row order); returned in input order.
    """
    n = len(uids)
    k = min(n, max(int(min_rows), math.ceil(fraction * n)))
    order = sorted(range(n), key=lambda i: uids[i])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), STREAM_SAMPLE]))
    chosen = [order[j] for j in rng.permutation(n)[:k]]
    return np.sort(np.asarray(chosen, dtype=np.int64))


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, schedule: str = "linear") -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: a linear ramp over
    ⌈warmup_ratio·total⌉ steps, then linear or cosine decay to 0 (HF Trainer's schedules) or constant."""
    warm = math.ceil(warmup_ratio * total)
    if step < warm:
        return peak * step / max(1, warm)
    if schedule == "constant":
        return peak
    progress = (step - warm) / max(1, total - warm)
    if schedule == "cosine":
        return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return peak * max(0.0, 1.0 - progress)


def lora_layer_indices(model: Any, lora_layers: int | None) -> list[int] | None:
    """Indices of the top ``lora_layers`` transformer blocks of ``model`` (None: all)."""
    if lora_layers is None:
        return None
    blocks = sorted({b for n, _ in model.named_parameters() if (b := block_index(n)) is not None})
    if not blocks:
        raise param_error("warmup", "lora_layers", "None for a model without numbered transformer blocks", lora_layers)
    return blocks[-int(lora_layers):]


def add_training_lora(model: Any, config: WarmupConfig) -> Any:
    """Wrap ``model`` with seeded trainable LoRA adapters (every base parameter frozen)."""
    torch = require("torch", "warm-up training")
    peft = require("peft", "warm-up training")
    layers = lora_layer_indices(model, config.lora_layers)
    cfg = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM",
                          layers_to_transform=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        wrapped = peft.get_peft_model(model, cfg)
    return wrapped


@dataclass
class WarmupResult:
    """What :func:`warmup_train` produced.

    Attributes:
        out_dir: the folder holding ``warmup.json`` and the checkpoints.
        checkpoints: checkpoint folders in epoch order.
        mean_lrs: η̄_c per epoch (the learning-rate weights' numerators).
        epoch_losses: mean training loss per epoch (over optimizer steps).
        sample_uids: the rows trained on, sorted.
        n_steps: optimizer steps in all.
        seconds: wall time of the training.
        cached: True when an existing folder with the same key was reused.
        summary: the content of ``warmup.json``.
    """

    out_dir: Path
    checkpoints: list[Path]
    mean_lrs: list[float]
    epoch_losses: list[float]
    sample_uids: list[str]
    n_steps: int
    seconds: float
    cached: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


def _key(uids: Sequence[str], model_id: str, config: WarmupConfig) -> str:
    from curate.pipeline.step import step_params

    h = hashlib.blake2b(digest_size=16)
    for u in sorted(uids):
        h.update(u.encode() + b"\n")
    h.update(json.dumps({"model": model_id, **step_params(config)}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def warmup_train(
    model: Any,
    examples: Sequence[Any],
    out_dir: str | os.PathLike[str],
    *,
    config: WarmupConfig | None = None,
    pad_token_id: int = 0,
    key: str = "",
    extra_meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> WarmupResult:
    """LoRA-train ``model`` on ``examples`` and write one checkpoint per epoch into ``out_dir``.

    Args:
        model: a causal LM (HF, float32 or float64); it is wrapped with fresh LoRA adapters in place.
        examples: :class:`~curate.features.lm.Encoded` rows (already sampled); rows without
            response tokens are skipped.
        out_dir: output folder, written through a temporary sibling folder and renamed into place
            (an existing folder is replaced).
        config: hyperparameters (defaults: the CPU preset).
        pad_token_id: id used for right padding (never attended to by real tokens).
        key: identity recorded in every checkpoint (cache key of the inputs and parameters).
        extra_meta: more fields for ``warmup.json`` (model id, sample uids, ...).
        progress: show a progress bar over optimizer steps.

    Returns:
        A :class:`WarmupResult`.

    Raises:
        SchemaError: no example has response tokens.
    """
    torch = require("torch", "warm-up training")
    import time

    cfg = config or WarmupConfig()
    live = [e for e in examples if int(e["n_response"]) > 0]
    if not live:
        raise SchemaError("no warm-up row has response tokens to train on.", field="messages",
                          expected="rows with assistant turns", found=f"{len(examples)} rows without")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            lm = add_training_lora(model, cfg)
            lm.train()
            named = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
            names = {id(p): n for n, p in named}
            opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=cfg.weight_decay)
            dev = next(lm.parameters()).device
            per_epoch = math.ceil(len(live) / cfg.batch_size)
            total = cfg.epochs * per_epoch
            step = 0
            mean_lrs, epoch_losses, ckpts = [], [], []
            bar = None
            if progress:
                bar = require("tqdm", "progress bars").tqdm(total=total, desc="warmup", unit="step")
            for epoch in range(1, cfg.epochs + 1):
                rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, STREAM_SHUFFLE, epoch]))
                order = rng.permutation(len(live))
                lrs, losses = [], []
                for s in range(0, len(live), cfg.batch_size):
                    batch = [live[i] for i in order[s : s + cfg.batch_size]]
                    lr = lr_at(step, total, cfg.lr, cfg.warmup_ratio, cfg.schedule)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    opt.zero_grad(set_to_none=True)
                    n_tok = sum(int(e["n_response"]) for e in batch)
                    batch.sort(key=lambda e: len(e["input_ids"]))
                    loss_total = 0.0
                    for m in range(0, len(batch), cfg.micro_batch_size):
                        ids, labels = collate(batch[m : m + cfg.micro_batch_size], pad_token_id)
                        out = lm(input_ids=ids.to(dev), use_cache=False)
                        loss = row_losses(out.logits, labels.to(dev), "sum").sum() / n_tok
                        loss.backward()
                        loss_total += float(loss.detach())
                    opt.step()
                    step += 1
                    lrs.append(lr)
                    losses.append(loss_total)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=epoch, loss=f"{loss_total:.3f}")
                mean_lr = float(np.mean(lrs))
                if not mean_lr > 0:  # a one-step epoch inside the ramp; weights need η̄ > 0
                    mean_lr = float(cfg.lr) * 1e-6
                mean_lrs.append(mean_lr)
                epoch_losses.append(float(np.mean(losses)))
                name = f"{CKPT_PREFIX}{epoch}"
                lm.eval()
                save_checkpoint(lm, opt, names, tmp / name, {
                    "epoch": epoch, "mean_lr": mean_lr, "steps": len(lrs), "global_step": step,
                    "train_loss": epoch_losses[-1], "key": key, "lora_layers": cfg.lora_layers,
                })
                lm.train()
                ckpts.append(name)
            if bar is not None:
                bar.close()
        lm.eval()
        seconds = time.perf_counter() - t0
        from curate.pipeline.step import step_params

        summary = {"key": key, "config": step_params(cfg), "checkpoints": ckpts, "mean_lrs": mean_lrs,
                   "epoch_losses": epoch_losses, "n_train": len(live), "n_skipped": len(examples) - len(live),
                   "n_steps": step, "n_trainable": int(sum(p.numel() for _, p in named)),
                   "seconds": round(seconds, 3), **(extra_meta or {})}
        (tmp / WARMUP_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return WarmupResult(out_dir, [out_dir / c for c in ckpts], mean_lrs, epoch_losses,
                        list(summary.get("sample_uids", [])), step, seconds, False, summary)


def run_warmup(
    table: pl.DataFrame,
    out_dir: str | os.PathLike[str],
    *,
    model: str = "default",
    config: WarmupConfig | None = None,
    device: str = "auto",
    dtype: str = "float32",
    progress: bool = False,
) -> WarmupResult:
    """Sample the pool, load the causal LM and run :func:`warmup_train` (cached by key).

    A folder that already holds a complete warm-up with the same key (sample uids, model,
    hyperparameters) is reused as is; a non-empty folder that is not a warm-up output is refused.

    Args:
        table: canonical table (sft rows; preference rows train on prompt + chosen).
        out_dir: where ``warmup.json`` and ``ckpt1..C`` go.
        model: ``"default"`` (packaged SmolLM2-135M-Instruct) or a local HF folder.
        config: hyperparameters (:class:`WarmupConfig`).
        device: ``auto`` | ``cpu`` | ``cuda``.
        dtype: ``float32`` | ``float64``.
        progress: show a progress bar.

    Raises:
        FileNotFoundError: missing model folder. SchemaError: bad table, no trainable rows, or
        ``out_dir`` is a non-empty folder that is not a warm-up output.
    """
    from curate.features.lm import encode_examples, load_causal_lm, resolve_model_path

    cfg = config or WarmupConfig()
    if dtype not in ("float32", "float64"):
        raise param_error("warmup", "dtype", "one of ('float32', 'float64')", dtype)
    if "uid" not in table.columns or table.height == 0:
        raise SchemaError("the warm-up pool is empty or has no uid column.", field="uid", expected="rows with uids",
                          found=f"{table.height} rows")
    out_dir = Path(out_dir)
    path = resolve_model_path(model)
    model_id = "default" if model == "default" else str(path.resolve())
    uids = table["uid"].to_list()
    pos = sample_rows(uids, cfg.fraction, cfg.min_rows, cfg.seed)
    sample = table[pos.tolist()]
    sample_uids = sorted(sample["uid"].to_list())
    key = _key(sample_uids, model_id + f"#{dtype}", cfg)
    existing = read_warmup(out_dir)
    if existing is not None and existing.get("key") == key:
        return WarmupResult(out_dir, [out_dir / c for c in existing["checkpoints"]], existing["mean_lrs"],
                            existing["epoch_losses"], existing.get("sample_uids", []), existing["n_steps"],
                            0.0, True, existing)
    if out_dir.exists() and existing is None and any(out_dir.iterdir()):
        raise SchemaError("refusing to overwrite a non-empty folder that is not a warm-up output.",
                          file=str(out_dir), expected=f"an empty folder or one with {WARMUP_FILE}", found="other files")
    lm, tok = load_causal_lm(path, device=device, dtype=dtype)
    examples = encode_examples(sample, tok, max_length=cfg.max_length)
    return warmup_train(lm, examples, out_dir, config=cfg, pad_token_id=int(tok.pad_token_id or 0), key=key,
                        extra_meta={"model": model_id, "dtype": dtype, "sample_uids": sample_uids,
                                    "pool_rows": table.height}, progress=progress)


# ------------------------------------------------------------------------------------ the step
@register_step("warmup")
@dataclass(frozen=True, kw_only=True)
class WarmupStep(WarmupConfig):
    """LESS warm-up: LoRA-train the causal LM on a seeded sample of the rows; keeps every row.

    Writes ``warmup.json`` and ``ckpt1..ckptC`` (adapters, ``adam_state.pt``, ``checkpoint.json`` with
    ``mean_lr``) under ``<run>/features/checkpoints/<save_as>``; a later ``grad_features`` step reads
    them with ``checkpoints: from_step`` (or ``from_step:<save_as>``). Extra output column
    ``in_warmup`` (bool): whether the row was trained on. The fields are :class:`WarmupConfig`'s
    (inherited) plus ``model``, ``dtype``, ``device`` and ``save_as``; ``seed`` None uses the recipe seed.
    """

    name: ClassVar[str] = "warmup"
    path_or_name_params: ClassVar[tuple[str, ...]] = ("model",)
    model: str = "default"
    seed: int | None = None  # type: ignore[assignment]  # None: the recipe seed
    dtype: str = "float32"
    device: str | None = None
    save_as: str = "warmup"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_targets", _as_tuple(self.lora_targets))
        check_int("warmup", "seed", self.seed, 0, allow_none=True)
        self.config(0)  # validates the shared fields
        if self.dtype not in ("float32", "float64"):
            raise param_error("warmup", "dtype", "one of ('float32', 'float64')", self.dtype)
        if not isinstance(self.save_as, str) or not self.save_as or "/" in self.save_as or self.save_as.startswith("."):
            raise param_error("warmup", "save_as", "a plain folder name", self.save_as)
        if self.model != "default" and not (Path(self.model) / "config.json").exists():
            raise param_error("warmup", "model", "'default' or a local Hugging Face model folder", self.model)

    def config(self, seed: int) -> WarmupConfig:
        """The run's :class:`WarmupConfig`: the step's shared fields, ``seed`` filled from the recipe."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(WarmupConfig)}
        return WarmupConfig(**{**shared, "seed": self.seed if self.seed is not None else seed})

    def apply(self, table: pl.DataFrame, ctx: Any) -> pl.DataFrame:
        from curate.features.lm import resolve_device

        device = resolve_device(self.device or getattr(ctx, "device", "auto") or "auto")
        out = step_checkpoint_dir(ctx.features.root, self.save_as)
        res = run_warmup(table, out, model=self.model, config=self.config(int(ctx.seed)), device=device,
                         dtype=self.dtype, progress=bool(getattr(ctx, "progress", False)))
        ctx.stats["warmup"] = {"folder": str(res.out_dir), "checkpoints": [p.name for p in res.checkpoints],
                               "mean_lrs": res.mean_lrs, "epoch_losses": res.epoch_losses,
                               "n_train": res.summary.get("n_train"), "cached": res.cached,
                               "seconds": round(res.seconds, 3)}
        chosen = set(res.summary.get("sample_uids", []))
        uids = table["uid"].to_list()
        return pl.DataFrame({"uid": uids, "keep": [True] * len(uids), "reason": [""] * len(uids),
                             "in_warmup": [u in chosen for u in uids]},
                            schema={"uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8, "in_warmup": pl.Boolean})
