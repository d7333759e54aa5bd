"""Warm-up checkpoints on disk: their layout, finding them, loading them, and weighting them.

Xia et al., "LESS", ICML 2024, arXiv 2402.04333, §4.1 and docs/methods/gradient-features.md §7. The
warm-up (:mod:`curate.features.warmup`) writes this layout; gradient features
(:mod:`curate.features.gradients`) and whitening (:mod:`curate.features.whiten`) read it. Keeping
it in one module lets each of them depend on the layout instead of on one another.

Layout::

    OUT/warmup.json              key, parameters, sampled uids, per-epoch losses, checkpoint list
    OUT/ckpt1 … OUT/ckptC/       one folder per epoch
        adapter_config.json, adapter_model.safetensors   (peft ``save_pretrained``)
        adam_state.pt            {"exp_avg": {name: tensor}, "exp_avg_sq": {name: tensor}}
        checkpoint.json          {"epoch", "mean_lr", "steps", "global_step", "train_loss", "key", ...}

Parameter names in ``adam_state.pt`` are the peft model's ``named_parameters()`` names, which are the
names :func:`~curate.features.gradients.select_parameters` returns after :func:`read_checkpoint`.
A recipe step ``warmup`` writes under ``<features root>/checkpoints/<save_as>``
(:func:`step_checkpoint_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curate._lazy import require
from curate.errors import SchemaError, param_error

WARMUP_FILE = "warmup.json"
CKPT_PREFIX = "ckpt"
FROM_STEP = "from_step"


# ------------------------------------------------------------------------------------ layout
def step_checkpoint_dir(features_root: str | os.PathLike[str], name: str = "warmup") -> Path:
    """Where the recipe step ``warmup`` (``save_as=name``) writes: ``<features root>/checkpoints/<name>``.

    ``grad_features`` resolves ``checkpoints: from_step`` (or ``from_step:<name>``) to the checkpoint
    folders listed there.
    """
    return Path(features_root) / "checkpoints" / name


def read_warmup(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``warmup.json`` of a warm-up folder whose checkpoints all exist, else None."""
    path = Path(folder) / WARMUP_FILE
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if not all((Path(folder) / c / "checkpoint.json").exists() for c in summary.get("checkpoints", [])):
        return None
    return summary


def checkpoint_dirs(folder: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint folders of a warm-up output folder, in epoch order.

    Raises:
        FileNotFoundError: no complete warm-up output in ``folder``.
    """
    summary = read_warmup(folder)
    if summary is None:
        raise FileNotFoundError(f"{folder}: no complete warm-up output ({WARMUP_FILE} with its checkpoints). "
                                "Run `curate warmup` or a recipe step `warmup` first.")
    return [Path(folder) / c for c in summary["checkpoints"]]


def save_checkpoint(model: Any, opt: Any, names: dict[int, str], folder: Path, meta: dict[str, Any]) -> None:
    """Write one checkpoint folder: peft adapters, Adam moments by parameter name, ``checkpoint.json``."""
    torch = require("torch", "warm-up training")
    model.save_pretrained(str(folder))
    exp_avg, exp_avg_sq = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            name = names[id(p)]
            exp_avg[name] = (st["exp_avg"] if "exp_avg" in st else torch.zeros_like(p)).detach().cpu().clone()
            exp_avg_sq[name] = (st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(p)).detach().cpu().clone()
    torch.save({"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, str(folder / "adam_state.pt"))
    (folder / "checkpoint.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------- loading
def read_checkpoint(model: Any, ckpt: str | os.PathLike[str]) -> tuple[Any, dict[str, Any], Path | None]:
    """Load a warm-up checkpoint folder: peft adapters (``adapter_config.json``), its meta
    (``checkpoint.json`` with ``mean_lr``) and the optimizer file (``adam_state.pt`` by name, or HF
    ``optimizer.pt``), if present."""
    peft = require("peft", "LoRA checkpoints")
    folder = Path(ckpt)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder not found.")
    if (folder / "adapter_config.json").exists():
        model = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    meta = json.loads((folder / "checkpoint.json").read_text()) if (folder / "checkpoint.json").exists() else {}
    opt = next((folder / f for f in ("adam_state.pt", "optimizer.pt") if (folder / f).exists()), None)
    model.eval()
    return model, meta, opt


def resolve_checkpoints(entries: Sequence[str], features_root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Expand ``checkpoints`` entries into checkpoint folders, in order.

    An entry is one of:
    - ``from_step`` / ``from_step:<name>``: the checkpoints written by the recipe step ``warmup``
      (``save_as: <name>``, default ``warmup``) under ``<features root>/checkpoints/<name>``;
    - a warm-up output folder (holds ``warmup.json``, as written by ``curate warmup``): all of its
      checkpoints in epoch order;
    - a single checkpoint folder (peft adapters and/or ``adam_state.pt`` / ``optimizer.pt``).

    Raises:
        FileNotFoundError: a folder does not exist or a ``from_step`` warm-up has not run.
    """
    out: list[Path] = []
    for entry in entries:
        entry = str(entry)
        if entry == FROM_STEP or entry.startswith(FROM_STEP + ":"):
            if features_root is None:
                raise FileNotFoundError(f"checkpoints '{entry}' needs a recipe run (a feature store folder).")
            name = entry.partition(":")[2] or "warmup"
            out.extend(checkpoint_dirs(step_checkpoint_dir(features_root, name)))
            continue
        folder = Path(entry).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: checkpoint folder not found.")
        out.extend(checkpoint_dirs(folder) if (folder / WARMUP_FILE).exists() else [folder])
    return out


def checkpoint_id(folder: str | os.PathLike[str]) -> str:
    """A cheap identity of a checkpoint folder for cache keys: its checkpoint.json and file sizes."""
    folder = Path(folder)
    h = hashlib.blake2b(digest_size=12)
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
            if f.name in ("checkpoint.json", "adapter_config.json"):
                h.update(f.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------- weighting
def lr_weights(mean_lrs: Sequence[float]) -> np.ndarray:
    """w_c = η̄_c / Σ η̄ (docs/methods/gradient-features.md §7)."""
    w = np.asarray(mean_lrs, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise param_error("lr_weights", "mean_lrs", "a non-empty list of finite numbers > 0", list(mean_lrs))
    return w / w.sum()


def stack_checkpoints(features: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Φ̃ = [√w₁Φ₁ | … | √w_CΦ_C] (N × C·d), so Φ̃Ψ̃ᵀ = Σ_c w_c Φ_cΨ_cᵀ
    (docs/methods/gradient-features.md §7)."""
    w = lr_weights(weights)
    if len(features) != len(w):
        raise SchemaError("one weight per checkpoint is needed.", field="weights",
                          expected=f"{len(features)} weights", found=len(w))
    return np.concatenate([np.sqrt(wc) * np.asarray(f, dtype=np.float64) for wc, f in zip(w, features, strict=True)], axis=1)
