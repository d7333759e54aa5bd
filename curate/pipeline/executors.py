"""Executors: where the embarrassingly parallel work of a step runs.

``local`` (default) runs shards one after another in this process. ``ray`` sends each shard to a
Ray task (Ray Core; ``ray.init()`` locally with the CPUs given, or ``address=`` for a cluster;
GPU tasks when GPUs exist and the work asks for them). Global work (LSH union-find, k-means,
selection solvers) never goes through an executor: it runs once on the driver.

:func:`sharded_map` adds crash-safe resume: each shard's result is written to
``<cache_dir>/<shard key>-<digest>.<parquet|npz|json>`` (temp name, then rename) where the key is a
hash of the shard's uids and the work's parameters, so a rerun after a crash recomputes only
unfinished shards, and a changed input or parameter never reuses a stale shard. Results are stored
as data, never as pickles (a run folder may come from someone else, and unpickling runs code):
a polars DataFrame as parquet; arrays, numpy scalars and tuples/lists of them as ``.npz`` read with
``allow_pickle=False``; plain JSON values as JSON. ``<digest>`` is the SHA-256 of the file's bytes,
checked on every read: a truncated or altered shard is recomputed with a warning naming the file.
A result of any other type is returned but not cached. We use Ray rather than a home-made
scheduler (docs/architecture.md): this module only splits, caches and orders.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from curate._lazy import require
from curate.io.writers import atomic_path

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, desc: str = "", num_gpus: float = 0.0) -> list[R]:
        """``[fn(x) for x in items]``, in order."""
        ...


class LocalExecutor:
    """Runs every shard in this process, in order, with an optional progress bar."""

    name = "local"

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, desc: str = "", num_gpus: float = 0.0) -> list[R]:
        if self.progress and len(items) > 1:
            from tqdm.auto import tqdm

            return [fn(x) for x in tqdm(items, desc=desc or "shards", unit="shard")]
        return [fn(x) for x in items]


class RayExecutor:
    """Runs shards as Ray tasks; results come back in input order.

    Args:
        address: a Ray cluster address, or None to start (or join) a local Ray with ``num_cpus``.
        num_cpus: CPUs of the local Ray started when ``address`` is None.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, progress: bool = False) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.progress = progress

    def _ray(self) -> Any:
        ray = require("ray", "the ray executor")
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False}
            if self.address:
                kwargs["address"] = self.address
            else:
                kwargs["num_cpus"] = self.num_cpus or os.cpu_count() or 1
            ray.init(**kwargs)
        return ray

    def map(self, fn: Callable[[T], R], items: Sequence[T], *, desc: str = "", num_gpus: float = 0.0) -> list[R]:
        if not items:
            return []
        ray = self._ray()
        gpus = num_gpus if num_gpus and ray.cluster_resources().get("GPU", 0) > 0 else 0
        task = ray.remote(num_gpus=gpus)(_call) if gpus else ray.remote(_call)
        fn_ref = ray.put(fn)  # shipped once, not once per shard
        refs = [task.remote(fn_ref, x) for x in items]
        if self.progress:
            from tqdm.auto import tqdm

            pending = list(refs)
            with tqdm(total=len(refs), desc=desc or "shards", unit="shard") as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    bar.update(len(done))
        return ray.get(refs)


def _call(fn: Callable[[T], R], x: T) -> R:
    """The Ray task body: an importable function, so any picklable ``fn`` can be sent."""
    return fn(x)


def get_executor(spec: str | Executor | None = "local", *, progress: bool = False, **kwargs: Any) -> Executor:
    """``"local"``, ``"ray"``, ``"ray://host:port"`` / ``"ray:auto"`` or an executor object."""
    if spec is None or spec == "local":
        return LocalExecutor(progress=progress)
    if isinstance(spec, str):
        if spec == "ray":
            return RayExecutor(progress=progress, **kwargs)
        if spec.startswith("ray:"):
            return RayExecutor(address=spec[4:], progress=progress, **kwargs)
        raise ValueError(f"unknown executor {spec!r}; use 'local', 'ray' or 'ray:<address>'.")
    return spec


def shard_key(uids: Sequence[str], params: dict[str, Any]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    for u in uids:
        h.update(b"\n" + u.encode())
    return h.hexdigest()


def split(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Half-open row ranges of at most ``shard_size`` rows."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(i, min(i + shard_size, n)) for i in range(0, n, shard_size)]


def sharded_map(
    fn: Callable[[Any], R],
    payloads: Sequence[Any],
    shard_uids: Sequence[Sequence[str]],
    *,
    params: dict[str, Any],
    executor: Executor | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    desc: str = "",
    num_gpus: float = 0.0,
) -> list[R]:
    """Apply ``fn`` to every payload (one per shard), reusing finished shards from ``cache_dir``.

    ``shard_uids[i]`` are the uids of shard ``i`` (its identity); ``params`` describe the work.
    Results are returned in shard order whatever the executor.
    """
    executor = executor or LocalExecutor()
    keys = [shard_key(u, params) for u in shard_uids]
    results: dict[int, R] = {}
    todo: list[int] = []
    folder = Path(cache_dir) if cache_dir is not None else None
    for i, key in enumerate(keys):
        found = _load(folder, key) if folder is not None else _MISSING
        if found is _MISSING:
            todo.append(i)
        else:
            results[i] = found
    if todo and folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def save(i: int, res: R) -> None:
        if folder is not None:
            _save(folder, keys[i], res)
        results[i] = res

    if executor.name == "local":
        # One shard at a time, saved as soon as it exists: a crash loses at most one shard.
        for i in todo:
            save(i, executor.map(fn, [payloads[i]], desc=desc, num_gpus=num_gpus)[0])
    elif todo:
        for i, res in zip(todo, executor.map(fn, [payloads[i] for i in todo], desc=desc, num_gpus=num_gpus)):
            save(i, res)
    return [results[i] for i in range(len(keys))]


_MISSING: Any = object()
_SUFFIXES = (".parquet", ".npz", ".json")


def _encode(obj: Any) -> tuple[str, bytes] | None:
    """``obj`` as (suffix, bytes) in a format read back without running code, or None."""
    import numpy as np
    import polars as pl

    buf = io.BytesIO()
    if isinstance(obj, pl.DataFrame):
        try:
            obj.write_parquet(buf, compression="zstd", statistics=False)
        except Exception:  # noqa: BLE001 - e.g. Object columns parquet cannot hold: leave uncached
            return None
        return ".parquet", buf.getvalue()
    arrays: list[Any] | None = None
    if isinstance(obj, (np.ndarray, np.generic)):
        kind, arrays = "scalar" if isinstance(obj, np.generic) else "array", [obj]
    elif isinstance(obj, (tuple, list)) and all(isinstance(x, (np.ndarray, np.generic)) for x in obj) and obj:
        kind, arrays = type(obj).__name__, list(obj)
    if arrays is not None:
        if any(np.asarray(a).dtype.hasobject for a in arrays):
            return None
        np.savez(buf, __kind__=np.array(kind), **{f"a{i}": np.asarray(a) for i, a in enumerate(arrays)})
        return ".npz", buf.getvalue()
    try:
        text = json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError):
        return None
    # Only values JSON gives back exactly (not tuples, not non-string keys) are cached as JSON.
    return (".json", text.encode()) if json.loads(text) == obj else None


def _decode(suffix: str, data: bytes) -> Any:
    import numpy as np
    import polars as pl

    if suffix == ".parquet":
        return pl.read_parquet(io.BytesIO(data))
    if suffix == ".npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            kind = str(z["__kind__"])
            arrays = [z[f"a{i}"] for i in range(len(z.files) - 1)]
        if kind == "scalar":
            return arrays[0][()]
        if kind == "array":
            return arrays[0]
        return tuple(arrays) if kind == "tuple" else arrays
    return json.loads(data)


def _load(folder: Path, key: str) -> Any:
    """The cached result of shard ``key`` in ``folder``, or ``_MISSING``. A file whose bytes do not
    match the digest in its name, or that does not decode, is removed with a warning."""
    for path in sorted(folder.glob(f"{key}-*")) if folder.is_dir() else []:
        if path.suffix not in _SUFFIXES:
            continue
        try:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest()[:32] != path.stem.rpartition("-")[2]:
                raise ValueError("its bytes do not match the checksum in its name (truncated or altered)")
            return _decode(path.suffix, data)
        except Exception as exc:  # noqa: BLE001 - any unreadable shard is recomputed, never trusted
            warnings.warn(f"shard cache {path} is unreadable ({type(exc).__name__}: {exc}); recomputing that shard.",
                          RuntimeWarning, stacklevel=3)
            path.unlink(missing_ok=True)
    return _MISSING


def _save(folder: Path, key: str, obj: Any) -> None:
    encoded = _encode(obj)
    if encoded is None:  # not storable as plain data: returned, recomputed after a crash
        return
    suffix, data = encoded
    digest = hashlib.sha256(data).hexdigest()[:32]
    with atomic_path(folder / f"{key}-{digest}{suffix}") as tmp:
        tmp.write_bytes(data)
