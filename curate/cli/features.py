"""CLI verbs of the feature stage: ``curate embed | gradients | warmup | whiten``.

Each verb reads a canonical parquet table (or a feature folder) and writes a feature folder, a
:class:`~curate.io.store.FeatureStore` of ``values.npy`` + ``uids.parquet`` + ``meta.json``
sets, or a warm-up checkpoint folder. ``--json`` prints one JSON summary as the last stdout line.
Bad input (a missing model folder, a field the rows' kind lacks, NaN features) raises a
``curate.errors`` type or ``FileNotFoundError``, which ``curate.cli.main`` maps to exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import polars as pl

from curate.cli._common import emit as _emit
from curate.cli._common import json_option
from curate.cli._common import read_table as _read_table
from curate.errors import SchemaError, param_error

EMBED_FIELDS = {"prompt": "prompt", "response": "response", "text": "prompt+response", "chosen": "chosen",
                "rejected": "rejected"}


def _check_field_kind(table: pl.DataFrame, field: str, path: str) -> None:
    """``chosen`` / ``rejected`` exist only on preference rows: name the first row that lacks it."""
    if field not in ("chosen", "rejected") or table.height == 0:
        return
    kinds = table["kind"].to_list()
    for i, k in enumerate(kinds):
        if k != "preference":
            raise SchemaError(f"field '{field}' exists only on preference rows.", file=path, line=i + 1, field=field,
                              expected="kind 'preference'", found=f"kind '{k}' (uid {table['uid'][i]})")


def _store_arg(path: str) -> Any:
    from curate.io.store import FeatureStore

    return FeatureStore(Path(path))




# ------------------------------------------------------------------------------------ embed
@click.command()
@click.argument("input_path", metavar="IN.parquet")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Feature folder (FEAT_DIR).")
@click.option("--model", default="default", show_default=True,
              help="'default' (packaged all-MiniLM-L6-v2), a local sentence-transformers folder, 'hashing[:dim]', "
                   "'lm' (RDS+ pooled final-layer hidden states of the packaged SmolLM2-135M-Instruct; feature "
                   "hidden/<field> instead of embed/<field>) or 'lm:<folder>' (the same for a local Hugging Face "
                   "causal-LM folder).")
@click.option("--field", "field_", type=click.Choice(sorted(EMBED_FIELDS)), default="text", show_default=True,
              help="What to embed; 'text' is prompt + response.")
@click.option("--pooling", type=click.Choice(["weighted_mean", "mean", "last"]), default="weighted_mean",
              show_default=True, help="Pooling of the hidden states ('lm' models only): position-weighted mean "
                                      "(RDS+/SGPT), plain mean, or the last token.")
@click.option("--max-length", default=512, show_default=True, type=int,
              help="Tokens kept per text, from the start ('lm' models only).")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx", "openvino"]), default="auto", show_default=True,
              help="Inference back-end of sentence-transformer models: 'auto' = torch (the fast exact path on the "
                   "CPUs measured); 'onnx' / 'openvino' (CPU) export the model once into the curate cache and need "
                   "the extra of that name.")
@click.option("--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True,
              help="'int8': per-channel dynamic int8 weights (onnx/openvino only; faster, not exact: see "
                   "benchmarks/RESULTS.md for cosine to fp32 and recall@10).")
@json_option
def embed(input_path: str, output: str, model: str, field_: str, pooling: str, max_length: int, batch_size: int,
          device: str, backend: str, quantize: str, as_json: bool) -> None:
    """Embed every row of IN.parquet into FEAT_DIR (cached per uid, model and field on rerun)."""
    from curate.features.embed import check_backend, check_lm_options, embed_table
    from curate.features.embed_backends import require_backend

    check_lm_options("embed", model, pooling, max_length)  # before reading anything
    backend, quantize = check_backend("embed", model, device, backend, quantize)
    require_backend(backend, quantize)
    table = _read_table(input_path)
    field = EMBED_FIELDS[field_]
    _check_field_kind(table, field, input_path)
    store = _store_arg(output)
    fs = embed_table(table, field, model=model, store=store, batch_size=batch_size,
                     device="cpu" if backend != "torch" else device, pooling=pooling, max_length=max_length,
                     backend=backend, quantize=quantize)
    summary = {"command": "embed", "output": output, "feature": fs.name, "rows": len(fs), "dim": fs.dim,
               "model": fs.meta["model"], "field": field, "n_computed": fs.meta["n_computed"],
               "cached": fs.meta["n_computed"] == 0, "device": fs.meta["device"], "backend": backend,
               "quantize": quantize}
    summary.update({k: fs.meta[k] for k in ("pooling", "max_length") if k in fs.meta})
    _emit(as_json, summary, [f"{fs.name}: {len(fs)} rows x {fs.dim} ({fs.meta['n_computed']} computed, "
                             f"{len(fs) - fs.meta['n_computed']} cached) -> {output}"])


# -------------------------------------------------------------------------------- gradients
def _params_arg(value: str) -> str:
    """``lora`` | ``mlp`` | ``mlp:K`` (the MLPs of the last K blocks) | any preset or globs of grad_features."""
    if value.startswith("mlp:"):
        k = value.partition(":")[2]
        if not k.isdigit() or int(k) < 1:
            raise param_error("gradients", "params", "'lora', 'mlp' or 'mlp:K' with an integer K >= 1", value)
        return f"mlp_last_blocks:{k}"
    return value


@click.command()
@click.argument("input_path", metavar="IN.parquet")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Feature folder (FEAT_DIR).")
@click.option("--model", default="default", show_default=True,
              help="'default' (packaged SmolLM2-135M-Instruct) or a local Hugging Face causal-LM folder.")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(),
              help="Warm-up checkpoint folder, or a `curate warmup` output folder (all its epochs). Repeatable.")
@click.option("--params", default="lora", show_default=True, help="lora | mlp | mlp:LAST_K | name globs.")
@click.option("--proj-dim", default=512, show_default=True, type=int, help="Projection dimension d (0: none).")
@click.option("--projection", type=click.Choice(["dense", "factored"]), default="dense", show_default=True,
              help="'dense': Rademacher sketch of the whole gradient (LESS/TRAK); 'factored': per-layer "
                   "P_out ⊗ P_in on layer inputs and output gradients (LoGra), never forming per-example "
                   "gradients; --proj-dim is then the total budget (the realised width is reported).")
@click.option("--adam", is_flag=True, help="LESS Adam-preconditioned features (needs --checkpoint).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--max-length", default=512, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@json_option
def gradients(input_path: str, output: str, model: str, checkpoints: tuple[str, ...], params: str, proj_dim: int,
              projection: str, adam: bool, seed: int, max_length: int, batch_size: int, device: str,
              as_json: bool) -> None:
    """Per-example gradient features (LESS) of every row of IN.parquet into FEAT_DIR (grad/sgd or grad/adam)."""
    from curate.features.gradients import GradFeaturesStep
    from curate.features.lm import resolve_model_path
    from curate.pipeline.step import StepContext

    table = _read_table(input_path)
    if model != "default":
        resolve_model_path(model)  # FileNotFoundError naming the folder
    if proj_dim < 0:
        raise param_error("gradients", "proj-dim", "an integer >= 0 (0: no projection)", proj_dim)
    if projection == "factored" and proj_dim == 0:
        raise param_error("gradients", "proj-dim", "an integer >= 1 with --projection factored", proj_dim)
    step = GradFeaturesStep(model=model, checkpoints=tuple(checkpoints), params=_params_arg(params),
                            proj_dim=proj_dim or None, projection=projection, variant="adam" if adam else "sgd", seed=seed,
                            max_length=max_length, batch_size=batch_size, device=device, targets=False)
    store = _store_arg(output)
    ctx = StepContext(seed=seed, features=store, device=device)
    out = step.apply(table, ctx)
    fs = store[f"grad/{step.variant}"]
    reasons = {r: int(n) for r, n in out.filter(pl.col("reason") != "")["reason"].value_counts().rows()}
    summary = {"command": "gradients", "output": output, "feature": fs.name, "rows": len(fs),
               "shape": list(fs.values.shape), "variant": step.variant, "params": step.params,
               "n_params": fs.meta.get("n_params"),
               "proj_dim": fs.meta.get("proj_dim") if projection == "factored" else (proj_dim or None),
               "projection": projection, "seed": seed,
               "checkpoints": fs.meta.get("checkpoints", []), "lr_weights": fs.meta.get("lr_weights"),
               "layout_hash": fs.meta.get("layout_hash"), "projector_id": fs.meta.get("projector_id"),
               "reasons": reasons}
    _emit(as_json, summary, [f"{fs.name}: {len(fs)} rows, shape {tuple(fs.values.shape)} -> {output}"]
          + [f"  {n:6d}  {r}" for r, n in reasons.items()])


# ----------------------------------------------------------------------------------- warmup
@click.command()
@click.argument("input_path", metavar="IN.parquet")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Checkpoint folder (CKPT_DIR).")
@click.option("--model", default="default", show_default=True,
              help="'default' (packaged SmolLM2-135M-Instruct) or a local Hugging Face causal-LM folder.")
@click.option("--fraction", default=0.05, show_default=True, type=float, help="Share of the pool to train on.")
@click.option("--min-rows", default=200, show_default=True, type=int, help="At least this many rows (capped at the pool).")
@click.option("--epochs", default=4, show_default=True, type=int, help="Epochs; one checkpoint after each.")
@click.option("--lora-r", default=8, show_default=True, type=int)
@click.option("--lora-layers", default="4", show_default=True,
              help="Adapt only the top K transformer blocks ('all' for every block).")
@click.option("--lr", default=2e-5, show_default=True, type=float, help="Peak learning rate.")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@json_option
def warmup(input_path: str, output: str, model: str, fraction: float, min_rows: int, epochs: int, lora_r: int,
           lora_layers: str, lr: float, batch_size: int, max_length: int, seed: int, device: str,
           as_json: bool) -> None:
    """LESS warm-up: LoRA-train the causal LM on a seeded fraction of IN.parquet, one checkpoint per epoch."""
    from curate.features.lm import resolve_device
    from curate.features.warmup import WarmupConfig, run_warmup

    table = _read_table(input_path)
    if lora_layers != "all" and not lora_layers.isdigit():
        raise param_error("warmup", "lora-layers", "an integer K >= 1 or 'all'", lora_layers)
    cfg = WarmupConfig(fraction=fraction, min_rows=min_rows, epochs=epochs, lora_r=lora_r, lr=lr,
                       lora_alpha=4 * lora_r, batch_size=batch_size, max_length=max_length, seed=seed,
                       lora_layers=None if lora_layers == "all" else int(lora_layers))
    res = run_warmup(table, output, model=model, config=cfg, device=resolve_device(device))
    summary = {"command": "warmup", "output": output, "checkpoints": [str(p) for p in res.checkpoints],
               "mean_lrs": res.mean_lrs, "epoch_losses": res.epoch_losses, "n_train": res.summary.get("n_train"),
               "n_steps": res.n_steps, "n_trainable": res.summary.get("n_trainable"), "cached": res.cached,
               "seconds": round(res.seconds, 3)}
    _emit(as_json, summary, [f"warm-up on {res.summary.get('n_train')} rows, {res.n_steps} steps"
                             f"{' (cached)' if res.cached else ''} -> {output}"]
          + [f"  {p.name}: loss {loss:.4f}, mean lr {lr_:.3g}"
             for p, loss, lr_ in zip(res.checkpoints, res.epoch_losses, res.mean_lrs, strict=True)])


# ----------------------------------------------------------------------------------- whiten
def _one_set(folder: str, name: str | None, option: str, *, label: str, target: bool = False,
             pool_name: str | None = None) -> Any:
    """The feature set in ``folder``: the folder itself, the set named by ``option`` in a store, or
    the store's one candidate set (:func:`curate.selectors.run.resolve_feature_set`, shared with
    ``curate select``; on the target side ``<pool_name>/targets`` of a recipe store)."""
    from curate.selectors.run import resolve_feature_set

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"feature folder not found: {folder}.")
    if name is not None and not (path / "values.npy").exists():
        return _store_arg(folder)[name]
    return resolve_feature_set(path, target=target, pool_name=pool_name, label=label, choose=option)


@click.command()
@click.argument("feat_dir", metavar="FEAT_DIR")
@click.option("--target", "target_dir", required=True, help="Target feature folder (TARGET_FEAT_DIR).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output feature folder.")
@click.option("--ridge", default=1e-3, show_default=True, type=float, help="Relative ridge λ (Σ + λ·tr Σ/d·I).")
@click.option("--name", "pool_name", default=None, help="Pool feature set in FEAT_DIR when it holds several.")
@click.option("--target-name", default=None, help="Target feature set in TARGET_FEAT_DIR when it holds several.")
@click.option("--output-name", default=None, help="Name of the whitened set [default: grad/whitened or <name>/whitened].")
@json_option
def whiten(feat_dir: str, target_dir: str, output: str, ridge: float, pool_name: str | None, target_name: str | None,
           output_name: str | None, as_json: bool) -> None:
    """TAROT whitening: jointly whiten FEAT_DIR and TARGET_FEAT_DIR features into OUT_DIR."""
    from curate.features.whiten import whiten_sets
    from curate.io.paths import check_name
    from curate.io.store import cache_key

    if not ridge >= 0:
        raise param_error("whiten", "ridge", "a finite number >= 0", ridge)
    for option, value in (("--name", pool_name), ("--target-name", target_name), ("--output-name", output_name)):
        if value is not None:  # these become folder names in a feature store: refuse '..', '/x' before any work
            check_name("curate whiten", option, value, nested=True)
    pool = _one_set(feat_dir, pool_name, "--name", label="FEAT_DIR")
    target = _one_set(target_dir, target_name, "--target-name", label="--target", target=True, pool_name=pool.name)
    name = output_name or ("grad/whitened" if pool.name.startswith("grad/") else f"{pool.name}/whitened")
    wd, wq, zero = whiten_sets(pool, target, ridge=ridge, name=name)
    key = cache_key(list(pool.uids) + list(target.uids), {"pool": pool.meta.get("cache_key"),
                                                          "target": target.meta.get("cache_key"), "ridge": ridge})
    store = _store_arg(output)
    for fs in (wd, wq):
        fs.meta["cache_key"] = key
        store.put(fs)
    summary = {"command": "whiten", "output": output, "feature": wd.name, "target_feature": wq.name,
               "rows": len(wd), "target_rows": len(wq), "dim": wd.dim, "ridge": ridge,
               "n_zero_rows": int(wd.meta["n_zero_rows"]), "source": [pool.name, target.name]}
    _emit(as_json, summary, [f"{wd.name}: {len(wd)} rows, {wq.name}: {len(wq)} rows, d={wd.dim} -> {output}"])


COMMANDS = (embed, gradients, warmup, whiten)
