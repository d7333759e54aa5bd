"""Former home of the tracked-module capture, kept so that existing imports keep working.

The mechanism lives in :mod:`curate.features.capture` (one capture for curvature, scores, Quad's
reward, per-example gradients and the factored projection); ``Tracker`` is its
:class:`~curate.features.capture.TrackedModules`. New code imports from there.
"""

from __future__ import annotations

from curate.features.capture import (
    ATTN_PATTERN,
    MLP_PATTERN,
    BatchCapture,
    Capture,
    TrackedModules,
    batch_captures,
    is_conv1d,
    is_trackable,
    layer_dims,
    per_sequence_grads,
    select_modules,
)

Tracker = TrackedModules

__all__ = ["ATTN_PATTERN", "MLP_PATTERN", "BatchCapture", "Capture", "TrackedModules", "Tracker", "batch_captures",
           "is_conv1d", "is_trackable", "layer_dims", "per_sequence_grads", "select_modules"]
