"""Lazy imports of optional heavy dependencies with an actionable message."""

from __future__ import annotations

import importlib
from types import ModuleType

from curate.errors import MissingDependencyError

# module name -> (pip name, extra of curate that brings it; "" when no extra does)
_HINTS: dict[str, tuple[str, str]] = {
    "torch": ("torch==2.13.0", "ml"),
    "transformers": ("transformers", "ml"),
    "sentence_transformers": ("sentence-transformers", "ml"),
    "faiss": ("faiss-cpu", "ml"),
    "ot": ("POT", "ml"),
    "datasketch": ("datasketch", "ml"),
    "sklearn": ("scikit-learn", "ml"),
    "scipy": ("scipy", "ml"),
    "peft": ("peft", "ml"),
    "gguf": ("gguf", "ml"),
    "ray": ("ray", "ml"),
    "matplotlib": ("matplotlib", "ml"),
    "fastapi": ("fastapi", "judge"),
    "uvicorn": ("uvicorn", "judge"),
    "httpx": ("httpx", "judge"),
    "datasets": ("datasets", "hf"),
    "huggingface_hub": ("huggingface_hub", "hf"),
    "umap": ("umap-learn", ""),
    "lingua": ("lingua-language-detector", "lang"),
}


def extra_for(module: str) -> str | None:
    """The extra of curate (``pip install 'curate[EXTRA]'``) that installs ``module``, if any."""
    return _HINTS.get(module.split(".")[0], ("", ""))[1] or None


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        pip_name, extra = _HINTS.get(top, (top, ""))
        why = f" (needed for {purpose})" if purpose else ""
        hint = f"pip install '{pip_name}'"
        if extra:
            hint += f" or pip install -e '.[{extra}]'"
        raise MissingDependencyError(f"curate needs the '{top}' package{why}: {hint}.", name=top) from exc
