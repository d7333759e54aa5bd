"""Datasets on the Hugging Face Hub as recipe inputs (``inputs: [{hub: ORG/NAME, split: train}]``).

The revision is resolved to a commit sha first (``HfApi.dataset_info``) and the data is then loaded
at that sha with ``datasets.load_dataset``, so the manifest names exactly what was read: the repo,
the requested and the resolved revision, and every data file of the repo at that commit with its
size and hash (the LFS sha256, or the git blob id of a small file). Nothing here runs unless a
recipe names a ``hub:`` input; answers are memoised for the life of the process so describing an
input (for the manifest and cache key) and reading it resolve once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from curate._lazy import require
from curate.errors import SchemaError
from curate.io.detect import is_data_file

_RESOLVED: dict[tuple[str, str | None], dict[str, Any]] = {}
_LOADED: dict[tuple[str, str | None, str | None, str], Any] = {}


def resolve(repo: str, revision: str | None = None) -> dict[str, Any]:
    """``{hub, revision, resolved_revision, files: [{path, size, sha256 | blob_id}], sha256}`` of a
    Hub dataset; ``sha256`` hashes the resolved revision and the file hashes (the input's identity)."""
    key = (repo, revision)
    if key in _RESOLVED:
        return _RESOLVED[key]
    hub = require("huggingface_hub", "hub inputs")
    try:
        info = hub.HfApi().dataset_info(repo, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many types (network, auth, 404)
        raise SchemaError(f"cannot resolve the Hub dataset ({type(exc).__name__}: {exc}).", file=f"hub:{repo}",
                          field="revision", expected="an existing dataset repo and revision",
                          found=revision or "main") from None
    files = []
    for s in info.siblings or []:
        if not is_data_file(s.rfilename):
            continue
        entry: dict[str, Any] = {"path": s.rfilename, "size": s.size}
        if s.lfs is not None:
            entry["sha256"] = s.lfs.sha256
        else:
            entry["blob_id"] = s.blob_id
        files.append(entry)
    files.sort(key=lambda f: f["path"])
    digest = hashlib.sha256(json.dumps([info.sha, files], sort_keys=True).encode()).hexdigest()
    card = getattr(info, "card_data", None)
    licence = getattr(card, "license", None) if card is not None else None
    out = {"hub": repo, "revision": revision, "resolved_revision": info.sha, "files": files, "sha256": digest,
           "license": licence if isinstance(licence, str) else None}
    _RESOLVED[key] = out
    return out


def load(repo: str, *, split: str, revision: str | None = None, config: str | None = None) -> Any:
    """The ``split`` of a Hub dataset at its resolved revision, as a ``datasets.Dataset``."""
    sha = resolve(repo, revision)["resolved_revision"]
    key = (repo, config, sha, split)
    if key in _LOADED:
        return _LOADED[key]
    datasets = require("datasets", "hub inputs")
    try:
        ds = datasets.load_dataset(repo, config, split=split, revision=sha)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (missing split, config, network)
        raise SchemaError(f"cannot load the Hub dataset ({type(exc).__name__}: {exc}).", file=f"hub:{repo}",
                          field="split", expected="an existing config and split", found=split) from None
    _LOADED[key] = ds
    return ds
