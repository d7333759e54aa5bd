"""Preference curation beside the CHES selector: pair diagnostics, Curry-DPO curricula, trainer exports.

Importing this package registers the steps ``diagnose``, ``ifd`` and ``export`` (the CHES steps
``ches_states`` and ``ches`` live in :mod:`curate.selectors.ches`).
"""

from curate.preference import curriculum, diagnostics, export
from curate.preference.curriculum import RatedPrompt, curry_pairs, oasst_groups, order_curriculum
from curate.preference.diagnostics import (
    annotator_agreement,
    diagnose_pairs,
    ifd_scores,
    length_bias,
    ranking_accuracy,
    ref_margin,
    rm_votes,
)
from curate.preference.export import export_records, write_export

__all__ = [
    "RatedPrompt", "annotator_agreement", "curriculum", "curry_pairs", "diagnose_pairs", "diagnostics", "export",
    "export_records", "ifd_scores", "length_bias", "oasst_groups", "order_curriculum", "ranking_accuracy",
    "ref_margin", "rm_votes", "write_export",
]
