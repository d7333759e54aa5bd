"""LoRA fine-tuning and held-out answer loss of SmolLM2 for the selection benchmarks.

One training = fresh seeded LoRA adapters (rank ``lora_rank``) on the last ``lora_layers`` blocks of
the packaged SmolLM2-135M-Instruct (lower blocks frozen and without adapters, so backpropagation
stops there), AdamW at a constant learning rate, ``epochs`` passes over the subset in seeded
shuffled mini-batches, sequences cut to ``max_length`` tokens by curate's response-masked encoder
(chat template; loss on assistant tokens only). The evaluation is the mean response-token loss of
each held-out reference answer (one number per example, so selectors can be compared pairwise).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 8
    lr: float = 1e-3
    max_length: int = 256
    lora_layers: int = 4
    lora_rank: int = 8


def encode(table: pl.DataFrame, tok: Any, max_length: int) -> list[Any]:
    """Response-masked examples of ``table`` (rows without response tokens dropped)."""
    from curate.features.lm import encode_examples

    return [e for e in encode_examples(table, tok, max_length=max_length) if e.n_response > 0]


def batch_tensors(exs: list[Any], pad: int) -> tuple[Any, Any, Any]:
    import torch

    n = max(len(e.input_ids) for e in exs)
    ids = torch.full((len(exs), n), pad, dtype=torch.long)
    lab = torch.full((len(exs), n), -100, dtype=torch.long)
    att = torch.zeros((len(exs), n), dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        lab[i, : len(e.labels)] = torch.tensor(e.labels)
        att[i, : len(e.input_ids)] = 1
    return ids, lab, att


def example_losses(model: Any, exs: list[Any], pad: int, batch_size: int = 8) -> np.ndarray:
    """Mean response-token loss of each example (length-sorted batches, results in input order)."""
    import torch

    order = np.argsort([len(e.input_ids) for e in exs], kind="stable")
    out = np.zeros(len(exs))
    with torch.no_grad():
        for s in range(0, len(exs), batch_size):
            idx = order[s : s + batch_size]
            ids, lab, att = batch_tensors([exs[i] for i in idx], pad)
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            tgt = lab[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")
            mask = (tgt != -100).float()
            out[idx] = ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy()
    return out


def fresh_model(base_state: dict[str, Any], lm: Any, cfg: TrainConfig, seed: int) -> Any:
    """The base model with fresh seeded LoRA adapters on the last ``cfg.lora_layers`` blocks only."""
    import peft
    import torch

    lm.load_state_dict(base_state)
    total = lm.config.num_hidden_layers
    lora = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, bias="none",
                           task_type="CAUSAL_LM",
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                           layers_to_transform=list(range(total - cfg.lora_layers, total)))
    torch.manual_seed(seed)
    return peft.get_peft_model(lm, lora)


def train_eval(subset: list[Any], evals: dict[str, list[Any]], lm: Any, base_state: dict[str, Any], pad: int,
               cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """Fine-tune on ``subset`` for ``cfg.epochs`` epochs; per-example held-out losses per task."""
    import torch

    model = fresh_model(base_state, lm, cfg, seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    n_tokens = steps = 0
    for _ in range(cfg.epochs):
        perm = rng.permutation(len(subset))
        for s in range(0, len(perm), cfg.batch_size):
            ids, lab, att = batch_tensors([subset[i] for i in perm[s : s + cfg.batch_size]], pad)
            n_tokens += int(att.sum())
            loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    train_s = time.perf_counter() - t0
    model.eval()
    per_example = {t: example_losses(model, exs, pad).round(6).tolist() for t, exs in evals.items()}
    model.unload()  # drop the adapters; the next training reloads the base weights
    return {"per_example": per_example, "loss": {t: float(np.mean(v)) for t, v in per_example.items()},
            "train_s": round(train_s, 1), "steps": steps, "train_tok_per_s": round(n_tokens / max(train_s, 1e-9), 1)}


class RunCache:
    """Finished trainings in a JSON-lines file keyed by everything that changes them, so a stopped
    run resumes where it stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: that training reruns
                    continue
                self.done[d["key"]] = d["out"]

    @staticmethod
    def key(uids: list[str], seed: int, cfg: TrainConfig, eval_uids: list[str]) -> str:
        blob = json.dumps([sorted(uids), seed, asdict(cfg), eval_uids], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)

    def put(self, key: str, out: dict[str, Any]) -> None:
        self.done[key] = out
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "out": out}) + "\n")


def paired_interval(method: list[np.ndarray], base: list[np.ndarray], *, n_boot: int = 2000,
                    seed: int = 0) -> dict[str, float]:
    """Paired difference of held-out losses, method − base (negative = method better).

    ``method[s]`` and ``base[s]`` are per-example losses of seed s on the same examples.
    Returns the mean difference, a t-interval over the per-seed mean differences (the seed is the
    unit of replication; df = seeds − 1) and a bootstrap interval over examples of the
    seed-averaged differences, both 95%.
    """
    from scipy import stats

    d = np.stack([np.asarray(m) - np.asarray(b) for m, b in zip(method, base, strict=True)])  # (S, n)
    per_seed = d.mean(axis=1)
    mean = float(per_seed.mean())
    out = {"diff": round(mean, 4), "seeds": len(per_seed)}
    if len(per_seed) > 1:
        half = float(stats.t.ppf(0.975, len(per_seed) - 1) * per_seed.std(ddof=1) / np.sqrt(len(per_seed)))
        out["t_lo"], out["t_hi"] = round(mean - half, 4), round(mean + half, 4)
    ex = d.mean(axis=0)
    rng = np.random.default_rng(seed)
    boots = ex[rng.integers(0, len(ex), size=(n_boot, len(ex)))].mean(axis=1)
    out["boot_lo"], out["boot_hi"] = round(float(np.quantile(boots, 0.025)), 4), round(float(np.quantile(boots, 0.975)), 4)
    return out
