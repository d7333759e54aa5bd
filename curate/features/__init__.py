"""Features beside the table: embeddings, indexes, causal LMs, gradient features, warm-up
checkpoints and whitening.

Importing the package imports every module that registers a pipeline step, so the step registry
(``curate.pipeline.registry.load_steps``) is complete once ``curate.features`` is loaded. Shared
helpers (``lm_batches``, ``checkpoints``, ``lm``, ``projection``) register nothing.
"""

from curate.features import embed as embed  # registers "embed"
from curate.features import gradients as gradients  # registers "grad_features"
from curate.features import index as index
from curate.features import warmup as warmup  # registers "warmup"
from curate.features import whiten as whiten  # registers "whiten"
