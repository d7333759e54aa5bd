"""Tiny float64 models and tasks built in code for the influence tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from curate.influence.task import CausalLMTask

torch.set_num_threads(1)
DT = torch.float64


class RegressionTask:
    """0.5·Σ(f(x) − y)²; the true Fisher of a unit Gaussian is J Jᵀ: back-propagate 1."""

    def collate(self, ex):
        return torch.stack([e[0] for e in ex]), torch.stack([e[1] for e in ex])

    def loss(self, model, batch):
        x, y = batch
        return 0.5 * ((model(x).squeeze(-1) - y) ** 2).sum()

    def sampled_loss(self, model, batch, generator):
        return model(batch[0]).sum()

    def token_mask(self, batch):
        return None


class PlantedGradTask:
    """Examples (a, g): the loss Σ gᵀ(W a) makes ∂L/∂y = g exactly."""

    def collate(self, ex):
        return torch.stack([e[0] for e in ex]), torch.stack([e[1] for e in ex])

    def loss(self, model, batch):
        a, g = batch
        return (model(a) * g).sum()

    sampled_loss = None  # unused: these tests fit the empirical Fisher

    def token_mask(self, batch):
        return None


class LogisticTask:
    """Σ BCE-with-logits; deterministic true Fisher via gradient sqrt(p(1−p))·x."""

    def collate(self, ex):
        return torch.stack([e[0] for e in ex]), torch.stack([e[1] for e in ex])

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="sum")

    def sampled_loss(self, model, batch, generator):
        z = model(batch[0]).squeeze(-1)
        p = torch.sigmoid(z).detach()
        return (torch.sqrt(p * (1 - p)) * z).sum()

    def token_mask(self, batch):
        return None


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)


def regression_data(seed: int, n: int) -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(n, 10, generator=g, dtype=DT)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + 0.1 * torch.randn(n, generator=g, dtype=DT)
    return [(x[i], y[i]) for i in range(n)]


def trained_mlp(seed: int, n: int = 200) -> tuple[nn.Module, list]:
    model = mlp(seed)
    data = regression_data(seed, n)
    task = RegressionTask()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = task.collate(data)
    for _ in range(100):
        opt.zero_grad()
        (task.loss(model, batch) / n).backward()
        opt.step()
    return model, data


# ---------------------------------------------------------------- tiny transformer
class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads = heads

    def forward(self, x):
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(w, dim=-1)
        sh = (b, t, self.heads, w // self.heads)
        q, k, v = (z.reshape(sh).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / (w // self.heads) ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, w))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, width: int = 16, heads: int = 2, blocks: int = 2, max_len: int = 8) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, width), nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        t = input_ids.shape[1]
        x = self.emb(input_ids) + self.pos(torch.arange(t))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln(x))


TRACK = ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]


def arith_sequences(n: int, seed: int, vocab: int = 50, length: int = 8) -> list[dict]:
    """Noisy arithmetic: x_{t+1} = (x_t + step) mod vocab, 10% random tokens; first token is the prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start, step = rng.integers(0, vocab), rng.integers(1, 4)
        ids = [(int(start) + i * int(step)) % vocab for i in range(length)]
        for i in range(1, length):
            if rng.random() < 0.1:
                ids[i] = int(rng.integers(0, vocab))
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def trained_lm(seed: int, steps: int = 300) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM().to(DT)
    task = CausalLMTask()
    data = arith_sequences(512, seed + 7)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for s in range(steps):
        chunk = data[(s * 32) % 512 : (s * 32) % 512 + 32]
        opt.zero_grad()
        (task.loss(model, task.collate(chunk)) / (32 * 7)).backward()
        opt.step()
    return model.eval()


def sample_labels(model: nn.Module, examples: list[dict], seed: int) -> list[dict]:
    """Replace response labels by labels drawn from the model (a fixed true-Fisher sample)."""
    task = CausalLMTask()
    g = torch.Generator().manual_seed(seed)
    batch = task.collate(examples)
    with torch.no_grad():
        probs = model(batch["input_ids"])[:, :-1].softmax(-1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g).reshape(probs.shape[:2])
    labels = torch.where(batch["labels"][:, 1:] != -100, drawn, -100)
    return [{"input_ids": e["input_ids"], "labels": [-100] + labels[i, : len(e["labels"]) - 1].tolist()}
            for i, e in enumerate(examples)]


def pearson(a, b) -> float:
    a, b = np.ravel(np.asarray(a, dtype=float)), np.ravel(np.asarray(b, dtype=float))
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)
