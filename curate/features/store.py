"""The feature store's former home; it lives in :mod:`curate.io.store` (the layers below
``features``, the runner among them, need it). This module re-exports it so existing imports keep
working; new code imports ``curate.io.store``.
"""

from curate.io.store import FeatureSet, FeatureStore, cache_key

__all__ = ["FeatureSet", "FeatureStore", "cache_key"]
