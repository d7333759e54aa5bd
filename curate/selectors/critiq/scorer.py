"""CritiQ Scorer and selection (docs/methods/critiq.md §8-§9).

A Bradley–Terry model s(x) trained on agent-labelled pairs, L = −Σ log σ(s(x_w) − s(x_l))
("CritiQ", Guo et al., ACL 2025, arXiv 2502.19279, §3.3), then Gumbel top-k sampling of B rows
without replacement with probability ∝ exp(z/τ) (QuRating's sampling, Wettig et al., 2024;
Kool et al., 2019 for the Gumbel-top-k trick).

- ``embedding_linear`` (default): s(x) = wᵀe(x) on frozen normalised sentence embeddings; fitted as
  logistic regression without intercept on e(x_w) − e(x_l) (label 1) and its negation (label 0),
  L2 with C = 1.0.
- ``embedding_mlp``: one hidden layer of 256, weight decay, early stopping on a 5% split.

Deviations: the paper trains a scalar head on a causal LM (Qwen2.5-1.5B); ``lm_head`` is not
implemented here (CPU-only budget). We store the raw s, not sigmoid(s) (same ranking). The
QuRating tool's extra 10% token margin is not adopted; ``domain_quotas`` is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl

from curate._lazy import require
from curate.errors import SchemaError, param_error
from curate.selectors.base import BaseSelector, Choice, SelectContext, check_bool, check_choice, check_float

SCORERS = ("embedding_linear", "embedding_mlp")


def fit_bradley_terry(emb: np.ndarray, winners: np.ndarray, losers: np.ndarray, *, scorer: str = "embedding_linear",
                      C: float = 1.0, seed: int = 0) -> Any:
    """Fit s(x) on rows ``emb`` from (winner, loser) index pairs; returns a callable X -> scores."""
    x = np.asarray(emb, dtype=np.float64)
    diff = x[winners] - x[losers]
    if len(diff) == 0:
        raise SchemaError("no labelled pairs to train the CritiQ scorer on.", field="pairs", expected=">= 1 pair")
    if scorer == "embedding_linear":
        lm = require("sklearn.linear_model", "the CritiQ Bradley-Terry scorer")
        clf = lm.LogisticRegression(C=C, fit_intercept=False, max_iter=2000)
        clf.fit(np.vstack([diff, -diff]), np.r_[np.ones(len(diff)), np.zeros(len(diff))])
        w = clf.coef_.ravel().copy()
        return lambda X: np.asarray(X, dtype=np.float64) @ w
    if scorer == "embedding_mlp":
        return _fit_mlp(x, winners, losers, seed=seed)
    raise param_error("fit_bradley_terry", "scorer", f"one of {list(SCORERS)}", scorer)


def _fit_mlp(x: np.ndarray, winners: np.ndarray, losers: np.ndarray, *, seed: int, hidden: int = 256,
             weight_decay: float = 1e-3, max_epochs: int = 200, patience: int = 10) -> Any:
    torch = require("torch", "the CritiQ MLP scorer")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)).double()
    X = torch.from_numpy(x)
    n = len(winners)
    perm = torch.randperm(n, generator=g).numpy()
    n_val = max(1, n // 20) if n >= 20 else 0
    val, tr = perm[:n_val], perm[n_val:]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=weight_decay)

    def loss_of(idx: np.ndarray) -> Any:
        s = net(X).squeeze(-1)
        return -torch.nn.functional.logsigmoid(s[winners[idx]] - s[losers[idx]]).mean()

    best, best_state, bad = float("inf"), None, 0
    for _ in range(max_epochs):
        opt.zero_grad()
        loss = loss_of(tr)
        loss.backward()
        opt.step()
        with torch.no_grad():
            v = float(loss_of(val)) if n_val else float(loss)
        if v < best - 1e-6:
            best, best_state, bad = v, {k: t.clone() for k, t in net.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)

    def score(Xn: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.asarray(Xn, dtype=np.float64))).squeeze(-1).numpy()

    return score


def gumbel_keys(score: np.ndarray, *, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(z, key): z = standardised score, key = z/τ + Gumbel noise from the seeded stream."""
    s = np.asarray(score, dtype=np.float64)
    sd = s.std()
    z = (s - s.mean()) / sd if sd > 0 else np.zeros_like(s)
    u = np.random.default_rng(seed).random(len(s))
    u = np.clip(u, np.finfo(float).tiny, 1.0 - 1e-16)
    return z, z / temperature - np.log(-np.log(u))


def gumbel_topk(score: np.ndarray, k: int, *, temperature: float = 1.0, seed: int = 0, sample: bool = True,
                uids: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``k`` rows sampled without replacement with p ∝ exp(z/τ), in pick order.

    ``sample=False`` (or τ → 0) gives plain top-k. Ties are broken by ``uids`` (else by index).
    """
    z, key = gumbel_keys(score, temperature=temperature, seed=seed)
    key = key if sample else z
    tie = np.asarray(uids if uids is not None else np.arange(len(key)))
    order = np.lexsort((tie, -key))
    return order[:k]


def plackett_luce_inclusion(z: np.ndarray, temperature: float, k: int) -> np.ndarray:
    """Exact P(row i among the first k draws) under successive sampling ∝ exp(z/τ) (brute force)."""
    w = np.exp(np.asarray(z, dtype=np.float64) / temperature)
    n = len(w)
    out = np.zeros(n)

    def rec(left: list[int], prob: float, depth: int, chosen: list[int]) -> None:
        if depth == k:
            for i in chosen:
                out[i] += prob
            return
        tot = w[left].sum()
        for i in left:
            rec([j for j in left if j != i], prob * w[i] / tot, depth + 1, chosen + [i])

    rec(list(range(n)), 1.0, 0, [])
    return out


@dataclass(frozen=True, kw_only=True)
class CritiqSelector(BaseSelector):
    """CritiQ Scorer as a selector: Bradley–Terry on agent-labelled pairs, then Gumbel top-k.

    Args:
        pairs: parquet of judged pairs (``winner_uid``, ``loser_uid``; from ``curate critiq annotate``).
            Pairs whose uids are not in the pool are ignored (counted in the diagnostics).
        scorer: ``embedding_linear`` (default) or ``embedding_mlp``.
        C: inverse L2 strength of the linear scorer.
        temperature: τ of the Gumbel top-k (τ → 0 = top-k, τ → ∞ = uniform).
        sample: False gives plain top-B by score.
    """

    name: ClassVar[str] = "critiq"
    requires: ClassVar[tuple[str, ...]] = ("embed",)
    default_features: ClassVar[dict[str, str]] = {"embed": "embed"}
    invalid_examples: ClassVar[tuple[tuple[str, Any], ...]] = (("temperature", 0.0), ("C", -1.0), ("scorer", "lm"),
                                                               ("pairs", ""))

    path_params: ClassVar[tuple[str, ...]] = ("pairs",)
    pairs: str = ""
    scorer: str = "embedding_linear"
    C: float = 1.0
    temperature: float = 1.0
    sample: bool = True

    @classmethod
    def contract_params(cls, folder: Path, table: pl.DataFrame) -> dict[str, Any]:
        """The contract checks' parameters: 80 random judged pairs over ``table`` written to ``folder``."""
        rng = np.random.default_rng(0)
        uids = table["uid"].to_list()
        pairs = [rng.choice(len(uids), 2, replace=False) for _ in range(80)]
        path = folder / "contract_pairs.parquet"
        pl.DataFrame({"winner_uid": [uids[a] for a, _ in pairs], "loser_uid": [uids[b] for _, b in pairs]}
                     ).write_parquet(path)
        return {"pairs": str(path)}

    def __post_init__(self) -> None:
        if not isinstance(self.pairs, str) or not self.pairs:
            raise param_error("CritiQ", "pairs", "the path of a judged-pairs parquet", self.pairs)
        check_choice("CritiQ", "scorer", self.scorer, SCORERS)
        check_float("CritiQ", "C", self.C, lo=0.0, lo_open=True)
        check_float("CritiQ", "temperature", self.temperature, lo=0.0, lo_open=True)
        check_bool("CritiQ", "sample", self.sample)

    def _choose(self, ctx: SelectContext, k: int) -> Choice:
        from pathlib import Path

        path = Path(self.pairs)
        if not path.exists():
            raise FileNotFoundError(f"CritiQ pairs file not found: {path}.")
        pairs = pl.read_parquet(path)
        for col in ("winner_uid", "loser_uid"):
            if col not in pairs.columns:
                raise SchemaError("judged-pairs file lacks a column.", file=str(path), field=col, expected="str")
        pos = {u: i for i, u in enumerate(ctx.uids.tolist())}
        w = [pos.get(u) for u in pairs["winner_uid"].to_list()]
        lo = [pos.get(u) for u in pairs["loser_uid"].to_list()]
        ok = [i for i in range(len(w)) if w[i] is not None and lo[i] is not None]
        if not ok:
            raise SchemaError("no judged pair has both uids in the pool.", file=str(path), field="winner_uid",
                              expected="uids of the pool", found=pairs["winner_uid"][0] if pairs.height else None)
        emb = ctx.features["embed"]
        fn = fit_bradley_terry(emb, np.asarray([w[i] for i in ok]), np.asarray([lo[i] for i in ok]),
                               scorer=self.scorer, C=self.C, seed=ctx.seed)
        score = np.asarray(fn(emb), dtype=np.float64)
        z, key = gumbel_keys(score, temperature=self.temperature, seed=ctx.seed)
        order = gumbel_topk(score, k, temperature=self.temperature, seed=ctx.seed, sample=self.sample, uids=ctx.uids)
        wins = score[[w[i] for i in ok]] > score[[lo[i] for i in ok]]
        return Choice(order=order, score=score, extra={"z": z, "key": key if self.sample else z},
                      diagnostics={"n_pairs": len(ok), "n_pairs_outside_pool": pairs.height - len(ok),
                                   "train_pair_accuracy": float(wins.mean())})
