"""Agent annotation of a pool with the final CritiQ criteria (docs/methods/critiq.md §7).

Length-bucketed random pairing (render prompt + response, cut to ``max_data_chars``, sort by
length with ties by uid, ``n_buckets`` equal-count buckets, seeded shuffle within each bucket,
consecutive rows paired, ``n_pairs`` drawn uniformly), then every pair is judged by every
criterion and labelled by majority vote; pairs whose vote is None are dropped. By default every
judgment is asked in both orders and only verdicts that survive the swap vote
(curate.selectors.critiq.swap): a judge that always answers "A" then labels nothing.

Deviations: the reference script's ``--max_data_chars 0`` default empties every text; we use
20,000. How the paper groups by length is unverified; equal-count buckets are our reading.
Resumable: every judge call goes through the SQLite cache, so a rerun after a crash only pays for
the calls that had not finished; the output parquet is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from curate.errors import SchemaError, param_error
from curate.schema import texts
from curate.selectors.critiq.flow import Criterion, Pair, judge_pairs, majority_vote
from curate.selectors.critiq.judge import JudgeError, JudgeSession
from curate.selectors.critiq.swap import PositionLog

PAIRS_SCHEMA = {"a_uid": pl.Utf8, "b_uid": pl.Utf8, "label": pl.Utf8, "winner_uid": pl.Utf8, "loser_uid": pl.Utf8,
                "n_a": pl.Int64, "n_b": pl.Int64, "n_none": pl.Int64, "n_invalid": pl.Int64}


def render_pair_texts(table: pl.DataFrame, prompt_chars: int | None = None) -> tuple[list[str], list[str]]:
    """(chosen side, rejected side) texts of preference rows: the prompt (cut to ``prompt_chars``
    characters when given) followed by the response."""
    prompts, chosen, rejected = texts(table, "prompt"), texts(table, "chosen"), texts(table, "rejected")
    if prompt_chars is not None:
        prompts = [p[:prompt_chars] for p in prompts]
    fmt = "[Instruction]\n{p}\n\n[Response]\n{r}"
    return ([fmt.format(p=p, r=r) for p, r in zip(prompts, chosen, strict=True)],
            [fmt.format(p=p, r=r) for p, r in zip(prompts, rejected, strict=True)])


def human_pairs(table: pl.DataFrame) -> list[Pair]:
    """Preference rows → :class:`Pair` (chosen is A and better; the Flow swaps)."""
    pref = table.filter(pl.col("kind") == "preference")
    if pref.height == 0:
        raise SchemaError("no preference rows to mine criteria from.", field="kind", expected="'preference' rows",
                          found=f"{table.height} rows of kinds {sorted(set(table['kind'].to_list()))}")
    a, b = render_pair_texts(pref)
    return [Pair(f"{u}:chosen", f"{u}:rejected", x, y, "A") for u, x, y in zip(pref["uid"].to_list(), a, b, strict=True)]


def make_pairs(uids: Sequence[str], rendered: Sequence[str], *, n_pairs: int | None = None, n_buckets: int = 10,
               max_data_chars: int = 20000, seed: int = 0) -> list[Pair]:
    """Length-bucketed random pairs (answer field unused: "A").

    Args:
        uids: row ids; rendered: their texts (prompt + response).
        n_pairs: pairs to draw; default ``min(25000, N // 2)``.
    """
    owner = "make_pairs"
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 1:
        raise param_error(owner, "n_buckets", "an integer >= 1", n_buckets)
    if isinstance(max_data_chars, bool) or not isinstance(max_data_chars, int) or max_data_chars < 1:
        raise param_error(owner, "max_data_chars", "an integer >= 1", max_data_chars)
    if n_pairs is not None and (isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1):
        raise param_error(owner, "n_pairs", "an integer >= 1 or None", n_pairs)
    cut = [t[:max_data_chars] for t in rendered]
    order = sorted(range(len(uids)), key=lambda i: (len(cut[i]), uids[i]))
    rng = np.random.default_rng(seed)
    candidates: list[tuple[int, int]] = []
    for bucket in np.array_split(np.asarray(order, dtype=np.int64), min(n_buckets, max(len(order), 1))):
        b = bucket.copy()
        rng.shuffle(b)
        candidates += [(int(b[k]), int(b[k + 1])) for k in range(0, len(b) - 1, 2)]
    want = min(25000, len(uids) // 2) if n_pairs is None else n_pairs
    want = min(want, len(candidates))
    pick = np.sort(rng.choice(len(candidates), size=want, replace=False)) if want else np.zeros(0, np.int64)
    return [Pair(uids[i], uids[j], cut[i], cut[j], "A") for i, j in (candidates[k] for k in pick)]


def annotate_pairs(pairs: Sequence[Pair], criteria: Sequence[Criterion], worker: JudgeSession, *,
                   voting_threshold: int = 0, temperature: float = 0.0, max_tokens: int = 1024,
                   max_workers: int = 4, seed: int = 0, guided_choice: bool = False, swap: bool = True,
                   log: PositionLog | None = None) -> pl.DataFrame:
    """Judge every pair by every criterion; the label is the majority vote; None labels dropped.
    ``guided_choice`` restricts worker replies to the valid answers (see :func:`judge_pairs`).
    ``swap`` asks both orders and counts only consistent verdicts (an order-dependent one is an
    abstention, ``n_none``); ``log`` receives the position-bias counts. A judge answering one
    letter in more than 90% of calls raises a ``UserWarning``.

    Returns:
        ``a_uid, b_uid, label (A|B), winner_uid, loser_uid, n_a, n_b, n_none, n_invalid``.
    """
    if not criteria:
        raise param_error("annotate", "criteria", "a non-empty list", list(criteria))
    log = PositionLog(swap, worker.name) if log is None else log
    res = judge_pairs(worker, list(criteria), pairs, temperature=temperature, max_tokens=max_tokens, seed=seed,
                      max_workers=max_workers, phase="annotate", guided_choice=guided_choice, swap=swap, log=log)
    log.warn()
    names = sorted(res)
    rows = []
    for i, p in enumerate(pairs):
        rs = [res[n][i] for n in names]
        label = majority_vote(rs, voting_threshold)
        if label is None:
            continue
        rows.append({
            "a_uid": p.a_id, "b_uid": p.b_id, "label": label,
            "winner_uid": p.a_id if label == "A" else p.b_id, "loser_uid": p.b_id if label == "A" else p.a_id,
            "n_a": sum(r.vote == "A" and r.status == "ok" for r in rs),
            "n_b": sum(r.vote == "B" and r.status == "ok" for r in rs),
            "n_none": sum(r.status == "abstain" for r in rs), "n_invalid": sum(r.status == "invalid" for r in rs),
        })
    return pl.DataFrame(rows, schema=PAIRS_SCHEMA)


def check_labelled(pairs: pl.DataFrame, worker: JudgeSession, n_criteria: int, *, swap: bool = True) -> None:
    """Refuse an annotation that labelled no pair: the judge's replies were all ties, abstentions,
    order-dependent (``swap``: two calls per pair and criterion) or unparseable, and a scorer
    trained on nothing would select at random while looking fine.

    Raises:
        JudgeError: ``pairs`` is empty (the message gives the call counts to look at).
    """
    if pairs.height:
        return
    calls = worker.stats.as_dict().get("annotate", {})
    judged = calls.get("first", 0) // (max(n_criteria, 1) * (2 if swap else 1))
    raise JudgeError(f"the judge '{worker.name}' labelled 0 of {judged} pairs: every pair's votes were tied, "
                     f"abstained{', changed with the order of the texts' if swap else ''} or unparseable "
                     f"(calls: {calls}). Check the judge model and its replies "
                     "(--guided-choice helps small models); nothing was written.")


def annotate_table(table: pl.DataFrame, criteria: Sequence[Criterion], worker: JudgeSession, *,
                   n_pairs: int | None = None, n_buckets: int = 10, max_data_chars: int = 20000, seed: int = 0,
                   **kwargs: object) -> pl.DataFrame:
    """Pair the rows of a canonical table (§7) and annotate the pairs with ``criteria``."""
    rendered = texts(table, "prompt+response")
    pairs = make_pairs(table["uid"].to_list(), rendered, n_pairs=n_pairs, n_buckets=n_buckets,
                       max_data_chars=max_data_chars, seed=seed)
    return annotate_pairs(pairs, criteria, worker, seed=seed, **kwargs)  # type: ignore[arg-type]
