"""Seeded, tiled random projections (docs/methods/gradient-features.md §5).

φ = Rᵀg with R ∈ ℝ^{P×d}, R_ij = s_ij/√d, s_ij = ±1 (``rademacher``, default) or N(0, 1)
(``gaussian``), after TRAK's projector (Park et al., "TRAK: Attributing Model Behavior at Scale",
ICML 2023) as used by LESS (Xia et al., ICML 2024). R is defined tile by tile: tile k holds rows
[k·4096, (k+1)·4096) drawn from ``default_rng(SeedSequence([seed, STREAM_PROJ, k]))``, so R does not
depend on how the computation is chunked, and a projector for P₁ < P₂ is a row prefix of the one for
P₂. R is generated once per process (in memory when it fits ``max_cache_bytes``, else into a
memory-mapped file under the cache keyed by the projector id that later processes reuse), never
per call; TAROT's reference CPU projector regenerates its matrix every call, which we do not copy.

Deviation from TRAK: no CUDA fast_jl kernel; it would define a different R (different projector id).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from curate._lazy import require
from curate.errors import SchemaError, param_error

TILE = 4096
STREAM_PROJ = 0x50524F4A  # "PROJ": the seed stream of projections
KINDS = ("rademacher", "gaussian")
VERSION = 1

_MATRICES: dict[str, np.ndarray] = {}  # projector id -> R (P, d), int8 signs or float
_DEVICE_MATRICES: dict[tuple[str, str], Any] = {}  # (id, device) -> torch tensor
GENERATIONS: dict[str, int] = {}  # projector id -> how many times R was generated in this process


def generate_tile(seed: int, kind: str, k: int, dim: int, dtype: Any = np.float32) -> np.ndarray:
    """Tile k of the unscaled matrix S (``TILE`` rows, ``dim`` columns): int8 signs or floats."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), STREAM_PROJ, int(k)]))
    if kind == "rademacher":
        n = TILE * dim
        bits = np.unpackbits(np.frombuffer(rng.bytes((n + 7) // 8), dtype=np.uint8))[:n]
        return (bits.astype(np.int8) * 2 - 1).reshape(TILE, dim)
    return rng.standard_normal((TILE, dim), dtype=np.dtype(dtype))


class Projector:
    """A seeded random projection from P to d dimensions (identity when d is None or P ≤ d).

    Args:
        n_params: P, the gradient length.
        dim: d, or None for no projection.
        seed: the projection seed.
        kind: ``rademacher`` (stored as int8 signs) | ``gaussian`` (stored as float32, or float64
            with ``dtype="float64"`` for exactness tests).
        layout_hash: the parameter-layout hash of the gradients it projects (part of the id).
        max_cache_bytes: R larger than this goes to a memory-mapped file under ``cache_dir``.
        cache_dir: folder for memory-mapped projectors (default ``<curate cache>/projectors``).
        dtype: float dtype of Gaussian tiles.
    """

    def __init__(
        self,
        n_params: int,
        dim: int | None,
        *,
        seed: int = 0,
        kind: str = "rademacher",
        layout_hash: str = "",
        max_cache_bytes: int = 1 << 30,
        cache_dir: str | os.PathLike[str] | None = None,
        dtype: str = "float32",
    ) -> None:
        if not isinstance(n_params, int) or n_params < 1:
            raise param_error("Projector", "n_params", "an integer >= 1", n_params)
        if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
            raise param_error("Projector", "dim", "None or an integer >= 1", dim)
        if kind not in KINDS:
            raise param_error("Projector", "kind", f"one of {KINDS}", kind)
        if dtype not in ("float32", "float64"):
            raise param_error("Projector", "dtype", "float32 or float64", dtype)
        self.n_params, self.seed, self.kind, self.layout_hash = n_params, int(seed), kind, layout_hash
        self.identity = dim is None or n_params <= dim
        self.dim = n_params if self.identity else int(dim)  # type: ignore[arg-type]
        self.max_cache_bytes = int(max_cache_bytes)
        self.dtype = dtype
        if cache_dir is None:
            from curate.features.lm import cache_root

            cache_dir = cache_root() / "projectors"
        self.cache_dir = Path(cache_dir)

    @property
    def id(self) -> str:
        """Hash of (seed, kind, P, d, tile, layout hash, dtype); features from different ids never mix."""
        key = {"v": VERSION, "seed": self.seed, "kind": self.kind, "P": self.n_params, "d": self.dim,
               "tile": TILE, "layout": self.layout_hash, "identity": self.identity,
               "dtype": self.dtype if self.kind == "gaussian" else "int8"}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    def describe(self) -> dict[str, Any]:
        """Projector metadata for feature ``meta``."""
        return {"projector_id": self.id, "projection": "dense", "proj_seed": self.seed, "proj_kind": self.kind, "n_params": self.n_params,
                "proj_dim": self.dim, "identity": self.identity, "tile": TILE}

    @property
    def n_bytes(self) -> int:
        item = 1 if self.kind == "rademacher" else np.dtype(self.dtype).itemsize
        return self.n_params * self.dim * item

    # ------------------------------------------------------------------ the matrix
    def matrix(self) -> np.ndarray:
        """The unscaled matrix S (P, d) (R = S/√d), generated at most once per process."""
        if self.identity:
            raise ValueError("an identity projector has no matrix.")
        pid = self.id
        if pid in _MATRICES:
            return _MATRICES[pid]
        if self.n_bytes <= self.max_cache_bytes:
            mat = self._build(np.empty(self._shape(), dtype=self._np_dtype()))
        else:
            mat = self._mmap()
        _MATRICES[pid] = mat
        return mat

    def _shape(self) -> tuple[int, int]:
        return (self.n_params, self.dim)

    def _np_dtype(self) -> Any:
        return np.int8 if self.kind == "rademacher" else np.dtype(self.dtype)

    def _build(self, out: np.ndarray) -> np.ndarray:
        GENERATIONS[self.id] = GENERATIONS.get(self.id, 0) + 1
        for k in range(0, (self.n_params + TILE - 1) // TILE):
            lo, hi = k * TILE, min((k + 1) * TILE, self.n_params)
            out[lo:hi] = generate_tile(self.seed, self.kind, k, self.dim, self._np_dtype())[: hi - lo]
        return out

    def _mmap(self) -> np.ndarray:
        path = self.cache_dir / f"{self.id}.npy"
        if path.exists():
            mat = np.load(path, mmap_mode="r")
            if mat.shape == self._shape():
                return mat
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.id}.", suffix=".npy", dir=self.cache_dir)
        os.close(fd)
        try:
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=self._np_dtype(), shape=self._shape())
            self._build(mm)
            mm.flush()
            del mm
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return np.load(path, mmap_mode="r")

    # ------------------------------------------------------------------ projecting
    def project(self, grads: Any, *, tiles_per_chunk: int = 16) -> Any:
        """Φ = G R for a batch of flattened gradients G (B, P) (torch tensor or numpy array).

        Each chunk of ``tiles_per_chunk`` tiles of R is read once per batch. Output dtype: float64
        when G is float64, else float32.
        """
        torch = require("torch", "gradient projection")
        is_np = isinstance(grads, np.ndarray)
        g = torch.from_numpy(np.asarray(grads)) if is_np else grads
        if g.ndim != 2 or g.shape[1] != self.n_params:
            raise SchemaError("gradients do not match the projector.", field="grads",
                              expected=f"(B, {self.n_params})", found=tuple(g.shape))
        ftype = torch.float64 if g.dtype == torch.float64 else torch.float32
        if self.identity:
            out = g.to(ftype)
        else:
            in_memory = self.n_bytes <= self.max_cache_bytes
            mat = self._device_matrix(g.device) if in_memory else self.matrix()
            out = torch.zeros((g.shape[0], self.dim), dtype=ftype, device=g.device)
            step = TILE * max(1, int(tiles_per_chunk))
            for lo in range(0, self.n_params, step):
                hi = min(lo + step, self.n_params)
                r = mat[lo:hi] if in_memory else torch.from_numpy(np.array(mat[lo:hi])).to(g.device)
                out += g[:, lo:hi].to(ftype) @ r.to(ftype)
            out /= float(np.sqrt(self.dim))
        return out.cpu().numpy() if is_np else out

    def _device_matrix(self, device: Any) -> Any:
        torch = require("torch", "gradient projection")
        key = (self.id, str(device))
        if key not in _DEVICE_MATRICES:
            mat = self.matrix()
            _DEVICE_MATRICES[key] = torch.from_numpy(np.ascontiguousarray(mat)).to(device)
        return _DEVICE_MATRICES[key]


def clear_cache() -> None:
    """Forget the in-process matrices (tests; freeing memory)."""
    _MATRICES.clear()
    _DEVICE_MATRICES.clear()
