"""Curation stages: exact, MinHash and semantic dedup, heuristic filters, decontamination, PII.

Importing this package registers every step (``exact_dedup``, ``minhash_dedup``,
``semantic_dedup``, ``filter``, ``decontam``, ``pii``). Heavy dependencies load inside functions.
"""

from curate.curation.decontam import Decontam, NgramIndex, embedding_contamination, ngram_contamination
from curate.curation.exact import ExactDedup, exact_duplicates
from curate.curation.filters import HeuristicFilter, filter_table
from curate.curation.minhash import MinHashDedup, minhash_duplicates, minhash_signatures
from curate.curation.pii import PII, find_pii, pii_scan, redact_table, redact_text
from curate.curation.semantic import HashingEncoder, SemanticDedup, semantic_duplicates

__all__ = [
    "PII", "Decontam", "ExactDedup", "HashingEncoder", "HeuristicFilter", "MinHashDedup", "NgramIndex",
    "SemanticDedup", "embedding_contamination", "exact_duplicates", "filter_table", "find_pii",
    "minhash_duplicates", "minhash_signatures", "ngram_contamination", "pii_scan", "redact_table",
    "redact_text", "semantic_duplicates",
]
