"""Pieces every back-propagating pass over a causal LM shares (per-example gradient features and
the LESS warm-up training): right-padded batches, per-row response losses, the LoRA target
modules and the transformer block a parameter belongs to.

They live here, not in :mod:`curate.features.gradients`, so that warm-up training does not import
the gradient-feature module (which reads warm-up checkpoints).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from curate._lazy import require
from curate.features.lm import IGNORE

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_BLOCK_RE = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


def block_index(name: str) -> int | None:
    """The transformer block index in a parameter name (``...layers.3.mlp...`` -> 3), else None."""
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def collate(examples: Sequence[Any], pad_token_id: int = 0) -> tuple[Any, Any]:
    """Right-padded (ids, labels) LongTensors; padding gets label -100."""
    torch = require("torch", "gradient features")
    n = max(1, max(len(e["input_ids"]) for e in examples))
    ids = torch.full((len(examples), n), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        if k:
            ids[i, :k] = torch.as_tensor(list(e["input_ids"]), dtype=torch.long)
            labels[i, :k] = torch.as_tensor(list(e["labels"]), dtype=torch.long)
    return ids, labels


def row_losses(logits: Any, labels: Any, reduction: str = "mean") -> Any:
    """Per-row response loss (B,): ℓ_mean or ℓ_sum of −log p(ids_t | ids_<t) over labelled t."""
    torch = require("torch", "gradient features")
    lg = logits[:, :-1, :]
    lb = labels[:, 1:]
    mask = lb != IGNORE
    nll = torch.nn.functional.cross_entropy(
        lg.reshape(-1, lg.shape[-1]), lb.clamp_min(0).reshape(-1), reduction="none"
    ).reshape(lb.shape)
    total = (nll * mask.to(nll.dtype)).sum(dim=1)
    if reduction == "sum":
        return total
    return total / mask.sum(dim=1).clamp_min(1).to(nll.dtype)
