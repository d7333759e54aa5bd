"""The Step protocol: what a recipe step is and what it returns.

A step is a frozen keyword-only dataclass whose fields are its parameters, registered under a
name with :func:`curate.pipeline.registry.register_step`. The runner calls
``step.apply(table, ctx)`` with the rows still alive (every earlier step kept them) and expects a
DataFrame with exactly one row per input uid and the columns:

- ``uid`` (str), ``keep`` (bool), ``reason`` (str; "" is allowed only where keep is True),
- optionally ``score`` (f64) and any extra columns (e.g. ``cluster_id``).

The runner prefixes them ``<step name>__`` and joins them onto the table, so steps never delete
or reorder rows. Rows dropped by an earlier step get nulls in later step columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import polars as pl

from curate.errors import SchemaError
from curate.io.store import FeatureStore


@dataclass
class StepContext:
    """What a step may use besides its table.

    Attributes:
        seed: the recipe seed (steps derive their own randomness from it).
        features: the run's feature store (``run_dir/features``), or a temp one.
        targets: the recipe's target table (kind ``target``), when the recipe has ``targets``.
        step_dir: a folder where the step may write extra artifacts (cluster tables, plots).
        device: "auto" | "cpu" | "cuda" ...
        progress: whether to show progress bars.
        executor: the executor running the recipe ("local" or a Ray executor object).
    """

    seed: int = 0
    features: FeatureStore = field(default_factory=lambda: FeatureStore(Path(".curate_features")))
    targets: pl.DataFrame | None = None
    step_dir: Path | None = None
    device: str = "auto"
    progress: bool = False
    executor: Any = None  # an Executor (curate.pipeline.executors); None = local
    stats: dict[str, Any] = field(default_factory=dict)  # extra numbers a step wants in stats.json

    def map_shards(
        self,
        fn: Callable[[Any], Any],
        table: pl.DataFrame,
        *,
        params: dict[str, Any],
        shard_size: int = 1000,
        payload: Callable[[pl.DataFrame], Any] | None = None,
        desc: str = "",
        num_gpus: float = 0.0,
    ) -> list[Any]:
        """Run ``fn(payload(shard))`` over row shards of ``table`` on the run's executor.

        Shards are keyed by their uids and ``params`` and cached under ``step_dir/shards`` so a
        crashed step resumes with only its unfinished shards. Results come back in shard order;
        local and Ray executors give identical results.
        """
        from curate.pipeline.executors import LocalExecutor, sharded_map, split

        if getattr(self.executor, "name", "local") == "ray":
            from curate.io.plugins import ship_by_value

            ship_by_value()  # Ray workers cannot import a plugin file: send its code with the task

        ranges = split(table.height, shard_size) if table.height else []
        shards = [table.slice(a, b - a) for a, b in ranges]
        payloads = [payload(s) if payload else s for s in shards]
        return sharded_map(
            fn, payloads, [s["uid"].to_list() for s in shards], params=params,
            executor=self.executor or LocalExecutor(progress=self.progress),
            cache_dir=self.step_dir / "shards" if self.step_dir is not None else None,
            desc=desc, num_gpus=num_gpus,
        )


@runtime_checkable
class Step(Protocol):
    """A recipe step. ``name`` is the registry name (the recipe's ``use:``)."""

    name: ClassVar[str]

    def apply(self, table: pl.DataFrame, ctx: StepContext) -> pl.DataFrame: ...


def step_params(step: Any) -> dict[str, Any]:
    """The parameters of a step (its dataclass fields) as plain data, for manifests and keys."""
    if dataclasses.is_dataclass(step):
        return {f.name: _plain(getattr(step, f.name)) for f in dataclasses.fields(step)}
    return {}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def check_step_output(name: str, table: pl.DataFrame, out: pl.DataFrame) -> pl.DataFrame:
    """Validate a step's output (one row per input uid, keep/reason typed) and cast it."""
    for col, dtype in (("uid", pl.Utf8), ("keep", pl.Boolean), ("reason", pl.Utf8)):
        if col not in out.columns:
            raise SchemaError(f"step '{name}' returned no '{col}' column.", field=col, expected=str(dtype))
    if out.height != table.height or set(out["uid"].to_list()) != set(table["uid"].to_list()):
        raise SchemaError(
            f"step '{name}' must return one row per input uid.", expected=f"{table.height} rows", found=out.height
        )
    casts = [pl.col("keep").cast(pl.Boolean), pl.col("reason").cast(pl.Utf8).fill_null("")]
    if "score" in out.columns:
        casts.append(pl.col("score").cast(pl.Float64))
    out = out.with_columns(casts)
    bad = out.filter(~pl.col("keep") & (pl.col("reason") == ""))
    if bad.height:
        raise SchemaError(f"step '{name}' dropped rows without a reason.", field="reason", found=bad["uid"][0])
    return out
