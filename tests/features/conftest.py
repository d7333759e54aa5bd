"""Shared fixtures of the feature tests: the tiny tokenizer and a saved tiny Llama folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tok():
    from curate.features.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tok):
    """A float32 tiny Llama (seed 4) saved with its tokenizer, for steps that load a model by path."""
    from curate.features.tiny import tiny_llama

    folder = tmp_path_factory.mktemp("tinylm")
    tiny_llama(vocab_size=len(tok), dtype="float32", seed=4).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
