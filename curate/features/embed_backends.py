"""Exported inference back-ends for sentence-transformer embedders: ONNX Runtime and OpenVINO.

The sentence-transformer forward (transformer, pooling, normalisation) is exported once with
``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic batch and sequence axes) into
``<curate cache>/embedders/<key>/model.onnx``; ``quantize="int8"`` adds ``model.int8.onnx``, ONNX
Runtime's dynamic quantisation with per-channel int8 weights (int8 activations quantised per
batch at run time; Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018). The key hashes the model's identity (path and
content fingerprint), the exporter settings and the torch version, so a changed model is exported
again and two processes never share a stale file (export to a temporary name, then rename).
OpenVINO reads the same ONNX files and runs them at f32 inference precision.

Both back-ends keep curate's batching (texts tokenised once, length-sorted batches, identical
texts embedded once); only the forward pass changes. They run on the CPU. Measured on a 2-core
AVX-512 Xeon, plain torch fp32 was the fastest exact path, so ``backend="auto"`` means ``torch``
(benchmarks/bench_embed.py reports speed with cosine-to-fp32 and recall@10 so a user can choose).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from curate._lazy import require
from curate.errors import MissingDependencyError, param_error
from curate.features.embedders import Embedder

BACKENDS = ("auto", "torch", "onnx", "openvino")
QUANTIZE = ("none", "int8")
EXPORT_VERSION = 1
OPSET = 17
# back-end -> (module it imports, the curate extra that installs it)
_EXTRAS = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino")}


def resolve_backend(owner: str, backend: Any, quantize: Any) -> tuple[str, str]:
    """Validate ``backend`` / ``quantize`` and resolve ``auto`` (→ ``torch``).

    Raises:
        ParameterError: an unknown value, or ``int8`` with the torch back-end.
    """
    if backend not in BACKENDS:
        raise param_error(owner, "backend", f"one of {BACKENDS}", backend)
    q = "none" if quantize is None else quantize
    if q not in QUANTIZE:
        raise param_error(owner, "quantize", f"one of {QUANTIZE} (or null)", quantize)
    resolved = "torch" if backend == "auto" else backend
    if resolved == "torch" and q != "none":
        raise param_error(owner, "quantize", "'none' with the torch back-end (int8 needs backend onnx or openvino)",
                          quantize)
    return resolved, q


def require_backend(backend: str, quantize: str = "none") -> None:
    """Raise :class:`MissingDependencyError` naming the curate extra when a back-end is not installed.

    ``onnx`` needs onnxruntime and onnx (extra ``onnx``); ``openvino`` needs openvino and onnx (extra
    ``openvino``) and, for int8, onnxruntime's quantiser (extra ``onnx``).
    """
    if backend not in _EXTRAS:
        return
    module, extra = _EXTRAS[backend]
    needs = [(module, extra), ("onnx", extra)]  # the exporter writes onnx protos
    if quantize == "int8":
        needs.append(_EXTRAS["onnx"])
    for mod, ext in needs:
        try:
            __import__(mod)
        except ImportError:
            raise MissingDependencyError(
                f"the '{backend}' embedding back-end{' with int8' if quantize == 'int8' else ''} needs the '{mod}' "
                f"package, which the '{ext}' extra installs: pip install -e '.[{ext}]' (or use --backend torch).",
                name=mod) from None


def export_dir(model_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder of one model's exported graphs."""
    torch = require("torch", "exporting an embedder")
    if cache_dir is None:
        from curate.features.lm import cache_root

        cache_dir = cache_root() / "embedders"
    key = json.dumps({"model": model_id, "v": EXPORT_VERSION, "opset": OPSET, "torch": torch.__version__})
    return Path(cache_dir) / hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


def _atomic(dest: Path, write: Any) -> Path:
    """Run ``write(tmp_path)`` and rename the result onto ``dest`` (nothing half-written on failure)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=".onnx", dir=dest.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def export_onnx(st_model: Any, input_names: list[str], folder: Path, quantize: str = "none") -> Path:
    """The ONNX file of a sentence-transformer (exported, and int8-quantised, at most once per key)."""
    torch = require("torch", "exporting an embedder")
    fp32 = folder / "model.onnx"
    if not fp32.exists():
        names = list(input_names)

        class _Forward(torch.nn.Module):
            def __init__(self, st: Any) -> None:
                super().__init__()
                self.st = st

            def forward(self, *tensors: Any) -> Any:
                return self.st(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

        sample = {n: torch.ones((2, 8), dtype=torch.long) for n in names}
        if "token_type_ids" in sample:
            sample["token_type_ids"] = torch.zeros((2, 8), dtype=torch.long)
        axes = {n: {0: "batch", 1: "tokens"} for n in names} | {"embedding": {0: "batch"}}

        def write(tmp: Path) -> None:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes: axes are declared
                torch.onnx.export(_Forward(st_model).eval(), tuple(sample[n] for n in names), str(tmp),
                                  input_names=names, output_names=["embedding"], dynamic_axes=axes,
                                  opset_version=OPSET, dynamo=False)

        _atomic(fp32, write)
    if quantize == "none":
        return fp32
    int8 = folder / "model.int8.onnx"
    if not int8.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        def write8(tmp: Path) -> None:
            import logging

            logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # "run pre-processing"
            quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True)

        _atomic(int8, write8)
    return int8


class ExportedEmbedder(Embedder):
    """A sentence-transformer embedder whose forward pass runs in ONNX Runtime or OpenVINO.

    Args:
        base: a loaded :class:`~curate.features.embed.SentenceTransformerEmbedder` on the CPU (its
            tokenizer, truncation length and identity are reused; its model is exported).
        backend: ``onnx`` | ``openvino``.
        quantize: ``none`` | ``int8``.
        threads: intra-op threads (default: torch's thread count, so back-ends compare fairly).
        cache_dir: where exported graphs live (default ``<curate cache>/embedders``).
    """

    content_cache = True

    def __init__(self, base: Any, backend: str, quantize: str = "none", *, threads: int | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        torch = require("torch", "exporting an embedder")
        require_backend(backend, quantize)
        if getattr(base, "tokenizer", None) is None:
            raise param_error("embed", "backend", "'torch' for a sentence-transformers model without a Hugging "
                              "Face tokenizer", backend)
        self.base, self.backend, self.quantize = base, backend, quantize
        self.tokenizer, self.max_length, self.dim = base.tokenizer, base.max_length, base.dim
        self.device, self.dtype = "cpu", ("int8" if quantize == "int8" else "float32")
        self.model_id = f"{base.model_id}#{backend}" + ("-int8" if quantize == "int8" else "")
        probe = self.tokenizer(["a"])
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in probe]
        self.path = export_onnx(base.model, self.input_names, export_dir(base.model_id, cache_dir), quantize)
        threads = int(threads or torch.get_num_threads())
        if backend == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
            self._infer = lambda feeds: self._session.run(None, feeds)[0]
        else:
            import openvino as ov

            core = ov.Core()
            compiled = core.compile_model(core.read_model(str(self.path)), "CPU",
                                          {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
            out = compiled.output(0)
            self._infer = lambda feeds: compiled(feeds)[out]

    def _prepare(self, texts: list[str]) -> tuple[np.ndarray, Any]:
        return self.base._prepare(texts)

    def _encode_batch(self, state: Any, rows: np.ndarray) -> np.ndarray:
        kind, data = state
        idx = rows.tolist()
        if kind == "texts":  # the base tokenizer always tokenises here; kept for completeness
            raise param_error("embed", "backend", "a model with a Hugging Face tokenizer", self.backend)
        feats = self.tokenizer.pad({k: [data[k][i] for i in idx] for k in self.input_names}, return_tensors="np")
        return np.asarray(self._infer({k: np.asarray(feats[k], dtype=np.int64) for k in self.input_names}),
                          dtype=np.float32)
