"""Curation stages: exact, MinHash and semantic dedup, heuristic filters, decontamination, PII.

Importing this package registers every step (``exact_dedup``, ``minhash_dedup``,
``semantic_dedup``, ``filter``, ``decontam``, ``pii``, ``count_tokens``,
``lang_id``). Heavy dependencies load inside functions.
"""

from curate.curation.decontam import Decontam, NgramIndex, embedding_contamination, ngram_contamination
from curate.curation.exact import ExactDedup, exact_duplicates
from curate.curation.filters import HeuristicFilter, filter_table
from curate.curation.lang import LangId, lang_table
from curate.curation.minhash import MinHashDedup, minhash_duplicates, minhash_signatures
from curate.curation.pii import PII, find_pii, pii_scan, redact_table, redact_text
from curate.curation.semantic import HashingEncoder, SemanticDedup, semantic_duplicates
from curate.curation.tokens import CountTokens, count_table

__all__ = [
    "PII", "CountTokens", "Decontam", "ExactDedup", "HashingEncoder", "HeuristicFilter", "LangId", "MinHashDedup",
    "NgramIndex",
    "SemanticDedup", "count_table", "embedding_contamination", "exact_duplicates", "filter_table", "find_pii",
    "lang_table", "minhash_duplicates", "minhash_signatures", "ngram_contamination", "pii_scan", "redact_table",
    "redact_text", "semantic_duplicates",
]
