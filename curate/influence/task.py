"""Tasks: how curvature and scores get a loss from a model and a batch.

A task keeps the influence code independent of the model family. It turns a list of examples into
a batch (:meth:`collate`), gives the summed loss with the data labels (:meth:`loss`, the ℓ_sum of
docs/methods/gradient-features.md §2), a loss whose gradient is one sample of the true Fisher
(:meth:`sampled_loss`), and the token mask m_t of docs/methods/ekfac.md §3 (:meth:`token_mask`).

The same protocol serves causal LMs (:class:`CausalLMTask`, labels -100 on prompt and padding
tokens) and the tiny models the tests build in code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from curate._lazy import require

torch = require("torch", "influence functions")


@runtime_checkable
class Task(Protocol):
    """What :class:`~curate.influence.curvature.Curvature` and the score functions need."""

    def collate(self, examples: Sequence[Any]) -> Any:
        """Examples -> one batch (anything :meth:`loss` understands)."""
        ...

    def loss(self, model: Any, batch: Any) -> Any:
        """Scalar loss summed over the batch's examples (and tokens), data labels."""
        ...

    def sampled_loss(self, model: Any, batch: Any, generator: Any) -> Any:
        """Scalar loss whose gradient samples the true Fisher (labels drawn from the model)."""
        ...

    def token_mask(self, batch: Any) -> Any | None:
        """(B, T) 0/1 mask of real (non-padding) tokens, or None when every position counts."""
        ...


class CausalLMTask:
    """Summed next-token cross-entropy over response tokens of a causal LM.

    Examples are dicts with ``input_ids`` and ``labels`` (lists of ints, labels -100 on prompt
    tokens), as ``curate.features.lm.encode_examples`` produces. Batches are right padded so real
    tokens keep their positions and per-example gradients do not depend on the batch.

    Args:
        pad_token_id: id used for padding (its positions get mask 0 and label -100).
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = int(pad_token_id)

    def collate(self, examples: Sequence[Any]) -> dict[str, Any]:
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), n), -100, dtype=torch.long)
        attn = torch.zeros((len(examples), n), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            ids[i, :k] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(e["labels"], dtype=torch.long)
            attn[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    def _logits(self, model: Any, batch: dict[str, Any]) -> Any:
        device = next(model.parameters()).device
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                    use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out
        return logits[:, :-1, :], batch["labels"][:, 1:].to(device)

    def loss(self, model: Any, batch: dict[str, Any]) -> Any:
        logits, labels = self._logits(model, batch)
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )

    def sampled_loss(self, model: Any, batch: dict[str, Any], generator: Any) -> Any:
        logits, labels = self._logits(model, batch)
        flat = logits.reshape(-1, logits.shape[-1]).float()
        keep = labels.reshape(-1) != -100
        with torch.no_grad():
            probs = torch.softmax(flat[keep].detach().double(), dim=-1).cpu()
            drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(flat.device)
        return torch.nn.functional.cross_entropy(flat[keep], drawn, reduction="sum")

    def token_mask(self, batch: dict[str, Any]) -> Any:
        return batch["attention_mask"]
