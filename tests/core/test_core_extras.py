"""Optional extras in pyproject.toml stay consistent with each other and with the install hints."""

from __future__ import annotations

import tomllib
from pathlib import Path

from curate._lazy import _HINTS

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _extras() -> dict[str, list[str]]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def test_gpu_extra_is_ml_with_faiss_gpu_instead_of_faiss_cpu() -> None:
    extras = _extras()
    swapped = [("faiss-gpu>=1.15" if d.startswith("faiss-cpu") else d) for d in extras["ml"]]
    assert extras["gpu"] == swapped
    assert not any(d.startswith("faiss-cpu") for d in extras["gpu"])  # both wheels provide `faiss`


def test_hf_extra_brings_what_the_hints_name() -> None:
    hf = {d.split(">")[0].split("=")[0] for d in _extras()["hf"]}
    assert {pip for pip, extra in _HINTS.values() if extra == "hf"} <= hf
    assert {"datasets", "huggingface_hub", "fsspec"} <= hf
