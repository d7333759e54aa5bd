"""``curate judge serve``: a local OpenAI-compatible endpoint (``/v1/chat/completions``,
``/v1/models``) so the CritiQ Flow runs offline (specs/critiq.md §6, DESIGN.md "Models and judges").

Backends are pluggable: a backend is any callable ``(messages, params) -> str`` where ``params``
holds ``temperature``, ``max_tokens`` and ``seed``. The server maps the request's ``model`` field to
a backend, so one server can host several (tests run a rule-based worker and a scripted manager
behind one port). :class:`LMBackend` wraps a local causal LM (default: the packaged
SmolLM2-135M-Instruct through :func:`curate.features.lm.load_causal_lm`); it decodes greedily at
temperature 0 and samples with a seeded generator otherwise. A small model like SmolLM2-135M only
exercises the plumbing; it is a weak judge.

A backend may raise :class:`BackendHTTPError` to answer with a given status (fault injection).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from curate._lazy import require

Backend = Callable[[list[dict[str, str]], dict[str, Any]], str]


class BackendHTTPError(Exception):
    """Raised by a backend to make the server answer with ``status_code``."""

    def __init__(self, status_code: int, message: str = "") -> None:
        super().__init__(message or f"HTTP {status_code}")
        self.status_code = status_code


def make_app(backends: Mapping[str, Backend]) -> Any:
    """A FastAPI app serving ``backends`` (model name → backend). The first one is the default for
    requests whose ``model`` is unknown or missing."""
    fastapi = require("fastapi", "curate judge serve")
    from fastapi.responses import JSONResponse

    if not backends:
        raise ValueError("make_app needs at least one backend")
    names = list(backends)
    app = fastapi.FastAPI(title="curate judge", docs_url=None, redoc_url=None)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "curate"} for n in names]}

    @app.post("/v1/chat/completions")
    def chat(body: dict[str, Any]) -> Any:  # a plain def: FastAPI runs it in its thread pool
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            return JSONResponse({"error": {"message": "'messages' must be a list of {role, content} strings"}}, 400)
        model = body.get("model") if body.get("model") in backends else names[0]
        params = {"temperature": float(body.get("temperature", 1.0) or 0.0),
                  "max_tokens": int(body.get("max_tokens") or 512), "seed": body.get("seed")}
        try:
            text = backends[model](msgs, params)
        except BackendHTTPError as exc:
            return JSONResponse({"error": {"message": str(exc)}}, exc.status_code)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    return app


class LocalServer:
    """Run :func:`make_app` with uvicorn in a background thread on ``host`` (a free port by default).

    Use as a context manager; ``url`` is the ``base_url`` for clients (``http://host:port/v1``).
    """

    def __init__(self, backends: Mapping[str, Backend], *, host: str = "127.0.0.1", port: int = 0,
                 start_timeout_s: float = 20.0) -> None:
        self.backends = dict(backends)
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> LocalServer:
        uvicorn = require("uvicorn", "curate judge serve")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(make_app(self.backends), log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"judge server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        self._sock = sock
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None
        if getattr(self, "_sock", None) is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class LMBackend:
    """A local causal LM as a backend, through its chat template.

    Args:
        model: ``"default"`` (packaged SmolLM2-135M-Instruct) or a local HF folder.
        device: ``auto`` | ``cpu`` | ``cuda``.
        max_input_tokens: prompts are left-truncated to this many tokens.
    """

    def __init__(self, model: str = "default", *, device: str = "auto", dtype: str = "float32",
                 max_input_tokens: int = 4096) -> None:
        self.model_name = model
        self.device = device
        self.dtype = dtype
        self.max_input_tokens = max_input_tokens
        self._lm: Any = None
        self._tok: Any = None
        self._lock = threading.Lock()

    def load(self) -> LMBackend:
        if self._lm is None:
            from curate.features.lm import load_causal_lm

            self._lm, self._tok = load_causal_lm(self.model_name, device=self.device, dtype=self.dtype)
        return self

    def __call__(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        torch = require("torch", "the local judge")
        with self._lock:
            self.load()
            ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=False)
            if not torch.is_tensor(ids):
                ids = ids["input_ids"]
            ids = ids[:, -self.max_input_tokens :].to(self._lm.device)
            temperature = float(params.get("temperature") or 0.0)
            kwargs: dict[str, Any] = {"max_new_tokens": int(params.get("max_tokens") or 512),
                                      "pad_token_id": self._tok.pad_token_id,
                                      "attention_mask": torch.ones_like(ids)}
            if temperature > 0:
                seed = params.get("seed")
                torch.manual_seed(int(seed) if seed is not None else 0)
                kwargs.update(do_sample=True, temperature=temperature, top_p=1.0)
            else:
                kwargs.update(do_sample=False)
            with torch.no_grad():
                out = self._lm.generate(ids, **kwargs)
            return str(self._tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def serve(model: str = "default", *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          served_name: str | None = None) -> None:
    """Serve a local causal LM until interrupted (blocking); the ``curate judge serve`` verb."""
    uvicorn = require("uvicorn", "curate judge serve")
    backend = LMBackend(model, device=device).load()
    name = served_name or ("smollm2-135m-instruct" if model == "default" else str(model))
    uvicorn.run(make_app({name: backend}), host=host, port=port, log_level="info", access_log=False)
