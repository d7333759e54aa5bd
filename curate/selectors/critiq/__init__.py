"""CritiQ (Guo et al., ACL 2025, arXiv 2502.19279): LLM judges, the CritiQ Flow, agent annotation
and the Bradley–Terry scorer with Gumbel top-k selection. See docs/methods/critiq.md.

The ``critiq`` selector is listed in :data:`curate.selectors.SELECTORS`; importing this package
registers the ``critiq_mine`` / ``critiq_annotate`` recipe steps. Heavy and HTTP dependencies
(httpx, fastapi, uvicorn, torch, sklearn) are imported lazily.
"""

from __future__ import annotations

from curate.selectors.critiq.annotate import annotate_pairs, annotate_table, make_pairs
from curate.selectors.critiq.flow import (
    Criterion,
    CritiQFlow,
    FlowConfig,
    FlowResult,
    Pair,
    criterion_accuracy,
    judge_pairs,
    judge_single_prompt,
    load_criteria,
    majority_vote,
    triage,
    vote_accuracy,
)
from curate.selectors.critiq.judge import (
    BudgetExceeded,
    CacheMiss,
    Judge,
    JudgeCache,
    JudgeError,
    JudgeSession,
    OpenAICompatJudge,
    WorkerResult,
)
from curate.selectors.critiq.kb import STARTER_KB, load_kb
from curate.selectors.critiq.scorer import CritiqSelector, fit_bradley_terry, gumbel_topk
from curate.selectors.critiq.steps import CritiQAnnotate, CritiQMine

__all__ = [
    "STARTER_KB", "BudgetExceeded", "CacheMiss", "CritiQFlow", "CritiqSelector", "CritiQAnnotate", "CritiQMine", "Criterion", "FlowConfig",
    "FlowResult", "Judge", "JudgeCache", "JudgeError", "JudgeSession", "OpenAICompatJudge", "Pair", "WorkerResult",
    "annotate_pairs", "annotate_table", "criterion_accuracy", "fit_bradley_terry", "gumbel_topk",
    "judge_pairs", "judge_single_prompt", "load_criteria", "load_kb", "majority_vote", "make_pairs", "triage",
    "vote_accuracy",
]
