"""Feature sets: side-car arrays keyed by uid (docs/architecture.md "Contracts").

A :class:`FeatureSet` is stored in a folder as ``values.npy`` (memory-mappable), ``uids.parquet``
and ``meta.json``. It is always used aligned to a table's uids (:meth:`FeatureSet.align`); a
missing uid raises :class:`~curate.errors.MissingFeatureError` listing some of them.

The store lives in ``io`` because every layer above reads or writes it (the runner hands a
:class:`FeatureStore` to each step, selectors and the report read it), while nothing here needs
more than numpy, polars and the atomic writers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curate.errors import MissingFeatureError, SchemaError
from curate.io.paths import check_name, content_params
from curate.io.writers import atomic_dir


@dataclass
class FeatureSet:
    """Rows of ``values`` belong to ``uids`` (same order).

    Attributes:
        name: feature name, e.g. ``embed/prompt+response`` or ``grads``.
        uids: array of uid strings, unique.
        values: array of shape (n, ...) (float32 by default; anything numpy stores).
        meta: model, revision, dtype, projection dim, seed, curate version, cache key, ...
    """

    name: str
    uids: np.ndarray
    values: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.uids = np.asarray(self.uids, dtype=object)
        if self.values.shape[0] != len(self.uids):
            raise SchemaError(
                f"feature set '{self.name}' has {self.values.shape[0]} rows of values for {len(self.uids)} uids.",
                expected="one row per uid",
                found=self.values.shape,
            )
        if len(set(self.uids.tolist())) != len(self.uids):
            raise SchemaError(f"feature set '{self.name}' has duplicated uids.", field="uids")

    def __len__(self) -> int:
        return len(self.uids)

    def _repr_html_(self) -> str:
        """Compact notebook summary: name, rows × dimensions, dtype and the main metadata."""
        from curate.io import notebook as nb

        shown = {k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool)) and k != "uids"}
        return nb.box(f"FeatureSet · {self.name}", [
            f"<b>{len(self)}</b> rows × {nb.esc(self.dim)} ({nb.esc(self.values.dtype)})",
            nb.table(["meta", "value"], [(k, str(v)[:80]) for k, v in list(shown.items())[:10]]) if shown else "",
        ])

    @property
    def dim(self) -> int:
        return int(np.prod(self.values.shape[1:])) if self.values.ndim > 1 else 1

    def index_of(self, uids: Iterable[str]) -> np.ndarray:
        """Row positions of ``uids`` in this set; raises if any is missing."""
        pos = {u: i for i, u in enumerate(self.uids.tolist())}
        wanted = list(uids)
        missing = [u for u in wanted if u not in pos]
        if missing:
            raise MissingFeatureError(
                f"feature set '{self.name}' lacks {len(missing)} of {len(wanted)} uids, e.g. {missing[:5]}. "
                "Compute the feature for these rows (or rerun the step that makes it)."
            )
        return np.fromiter((pos[u] for u in wanted), dtype=np.int64, count=len(wanted))

    def align(self, uids: Iterable[str] | pl.Series) -> np.ndarray:
        """Values in the order of ``uids`` (e.g. ``table["uid"]``)."""
        if isinstance(uids, pl.Series):
            uids = uids.to_list()
        return np.asarray(self.values[self.index_of(uids)])

    def subset(self, uids: Sequence[str]) -> FeatureSet:
        return FeatureSet(self.name, np.asarray(list(uids), dtype=object), self.align(uids), dict(self.meta))

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the set to ``folder`` atomically (temp folder, then rename)."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            np.save(tmp / "values.npy", np.ascontiguousarray(self.values), allow_pickle=False)
            pl.DataFrame({"uid": self.uids.tolist()}, schema={"uid": pl.Utf8}).write_parquet(tmp / "uids.parquet")
            (tmp / "meta.json").write_text(json.dumps({"name": self.name, **self.meta}, indent=2, sort_keys=True, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, mmap: bool = True) -> FeatureSet:
        folder = Path(folder)
        if not (folder / "values.npy").exists():
            raise MissingFeatureError(f"no feature set in {folder} (values.npy missing).")
        meta = json.loads((folder / "meta.json").read_text())
        name = meta.pop("name", folder.name)
        values = np.load(folder / "values.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        uids = pl.read_parquet(folder / "uids.parquet")["uid"].to_numpy()
        return cls(name, uids, values, meta)


def external_set_folder(value: Any) -> Path | None:
    """``value`` as a feature-set folder made outside a run (an absolute path holding ``values.npy``;
    ``curate select --features DIR`` resolves its folders to these), else None: a name in a store."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    path = Path(value)
    return path if path.is_absolute() and (path / "values.npy").is_file() else None


def cache_key(uids: Iterable[str], params: Mapping[str, Any]) -> str:
    """Hash of the inputs' uids and the parameters (model, revision, field, dim, seed, ...).

    A parameter naming an existing file or folder (a checkpoint, EK-FAC factors, a local model) is
    keyed by its content (:func:`curate.io.paths.content_params`), so editing the file in place
    makes the cached set stale.
    """
    h = hashlib.blake2b(digest_size=16)
    for u in uids:
        h.update(u.encode())
        h.update(b"\n")
    h.update(json.dumps(content_params(dict(params)), sort_keys=True, default=str).encode())
    return h.hexdigest()


class FeatureStore:
    """A folder of feature sets, ``<root>/<safe name>/``; ``get`` returns None on a stale key.

    Names are checked with :func:`curate.io.paths.check_name` (parts joined by ``/``), so no name
    reaches outside ``root`` or onto a temporary entry: ``put`` replaces exactly one folder below it.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _folder(self, name: str) -> Path:
        check_name("the feature store", "name", name, nested=True)
        return self.root / name.replace("/", "__").replace("+", "_plus_")

    def __contains__(self, name: str) -> bool:
        return (self._folder(name) / "values.npy").exists()

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if (d / "meta.json").exists():
                out.append(json.loads((d / "meta.json").read_text()).get("name", d.name))
        return out

    def get(self, name: str, key: str | None = None) -> FeatureSet | None:
        """The stored set, or None if absent or if its ``cache_key`` differs from ``key``."""
        if name not in self:
            return None
        fs = FeatureSet.load(self._folder(name))
        if key is not None and fs.meta.get("cache_key") != key:
            return None
        return fs

    def __getitem__(self, name: str) -> FeatureSet:
        fs = self.get(name)
        if fs is None:
            raise MissingFeatureError(f"feature '{name}' is not in {self.root}; known: {self.names()}.")
        return fs

    def put(self, fs: FeatureSet) -> Path:
        return fs.save(self._folder(fs.name))
