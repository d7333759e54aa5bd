"""Features beside the table: embeddings, indexes, causal LMs, gradient features (issue 4)."""

from curate.features import embed as embed  # noqa: E402,F401  (registers the "embed" step)
from curate.features import gradients as gradients  # noqa: E402,F401  (registers the "grad_features" step)
from curate.features import index as index  # noqa: E402,F401
