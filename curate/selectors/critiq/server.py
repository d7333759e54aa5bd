"""``curate judge serve``: a local OpenAI-compatible endpoint (``/v1/chat/completions``,
``/v1/models``) so the CritiQ Flow runs offline (docs/methods/critiq.md §6, docs/architecture.md "Contracts").

Backends are pluggable: a backend is any callable ``(messages, params) -> str`` where ``params``
holds ``temperature``, ``max_tokens`` and ``seed``. The server maps the request's ``model`` field to
a backend, so one server can host several (tests run a rule-based worker and a scripted manager
behind one port). :class:`LMBackend` wraps a local causal LM (default: the packaged
SmolLM2-135M-Instruct through :func:`curate.features.lm.load_causal_lm`); it decodes greedily at
temperature 0 and samples with a seeded generator otherwise. A small model like SmolLM2-135M only
exercises the plumbing; it is a weak judge.

A backend may raise :class:`BackendHTTPError` to answer with a given status (fault injection).

Constrained replies: a request may carry a list of allowed reply strings in any of the forms
clients send (:func:`request_choices`): ``structured_outputs: {"choice": [...]}`` (vLLM >= 0.12),
``guided_choice: [...]`` (older vLLM) or ``response_format: {"type": "json_schema", "json_schema":
{"schema": {"type": "string", "enum": [...]}}}`` (OpenAI JSON schema; the reply content is then the
chosen string as a JSON string literal, as a schema-constrained server writes it). The server hands
the list to backends that declare ``supports_guided_choice = True`` in
``params["guided_choice"]`` and refuses it (HTTP 400) for the others; a reply outside the list is a
500. :class:`LMBackend` decodes token by token restricted to the allowed strings (a trie of their
token ids), greedy at temperature 0 like vLLM's guided decoding, so even a model too small to write
the JSON contract returns a valid reply whose content is the model's own preference.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from curate._lazy import require

Backend = Callable[[list[dict[str, str]], dict[str, Any]], str]
MAX_GUIDED_CHOICES = 64


def request_choices(body: Mapping[str, Any]) -> tuple[str | None, Any]:
    """``(form, choice list)`` of a chat request: the form (``structured_outputs``,
    ``guided_choice`` or ``response_format``) that carries a choice list, or ``(None, None)`` when
    there is none. A ``response_format`` of type ``text`` or ``json_object`` carries no list.

    Raises:
        ValueError: several forms at once, or a form this server cannot enforce (a message for the 400).
    """
    found: list[tuple[str, Any]] = []
    if body.get("guided_choice") is not None:
        found.append(("guided_choice", body["guided_choice"]))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict) or set(so) != {"choice"}:
            raise ValueError("'structured_outputs' is supported with a 'choice' list only")
        found.append(("structured_outputs", so["choice"]))
    rf = body.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not (isinstance(schema, dict) and schema.get("type") == "string" and "enum" in schema):
                raise ValueError("'response_format' json_schema is supported as {'type': 'string', 'enum': [...]} only")
            found.append(("response_format", schema["enum"]))
        elif kind not in ("text", "json_object"):
            raise ValueError("'response_format' must have type text, json_object or json_schema")
    if len(found) > 1:
        raise ValueError(f"give one choice form, not {', '.join(f for f, _ in found)}")
    return found[0] if found else (None, None)


class BackendHTTPError(Exception):
    """Raised by a backend to make the server answer with ``status_code`` (and ``headers``); with
    ``body`` the server sends those raw bytes instead of a JSON error (a fake of a broken proxy)."""

    def __init__(self, status_code: int, message: str = "", *, headers: Mapping[str, str] | None = None,
                 body: bytes | None = None) -> None:
        super().__init__(message or f"HTTP {status_code}")
        self.status_code = status_code
        self.headers = dict(headers or {})
        self.body = body


def make_app(backends: Mapping[str, Backend]) -> Any:
    """A FastAPI app serving ``backends`` (model name → backend). The first one is the default for
    requests whose ``model`` is unknown or missing."""
    fastapi = require("fastapi", "curate judge serve")
    from fastapi.responses import JSONResponse, Response

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
            form, choices = request_choices(body)
        except ValueError as exc:
            return JSONResponse({"error": {"message": str(exc)}}, 400)
        if choices is not None:
            if not (isinstance(choices, list) and choices and len(choices) <= MAX_GUIDED_CHOICES
                    and all(isinstance(c, str) and c for c in choices)):
                return JSONResponse({"error": {"message": f"the {form} choice list must hold 1 to "
                                               f"{MAX_GUIDED_CHOICES} non-empty strings"}}, 400)
            if not getattr(backends[model], "supports_guided_choice", False):
                return JSONResponse({"error": {"message": f"model '{model}' does not support guided_choice (sent as {form})"}}, 400)
            params["guided_choice"] = list(choices)
            params["choice_format"] = form
        try:
            text = backends[model](msgs, params)
        except BackendHTTPError as exc:
            if exc.body is not None:
                return Response(exc.body, exc.status_code, headers=exc.headers, media_type="application/json")
            return JSONResponse({"error": {"message": str(exc)}}, exc.status_code, headers=exc.headers)
        if choices is not None and text not in choices:
            return JSONResponse({"error": {"message": f"model '{model}' replied outside the {form} choices"}}, 500)
        if form == "response_format":  # a schema-constrained reply is the JSON document of the string
            text = json.dumps(text, ensure_ascii=False)
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
        max_input_tokens: longer prompts lose their oldest turns (the system message is kept).
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

    supports_guided_choice = True

    def load(self) -> LMBackend:
        if self._lm is None:
            from curate.features.lm import load_causal_lm

            self._lm, self._tok = load_causal_lm(self.model_name, device=self.device, dtype=self.dtype)
        return self

    def _template(self, messages: list[dict[str, str]]) -> Any:
        torch = require("torch", "the local judge")
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=False)
        return ids if torch.is_tensor(ids) else ids["input_ids"]

    def _prompt_ids(self, messages: list[dict[str, str]]) -> Any:
        """The templated prompt, at most ``max_input_tokens`` long. A longer conversation loses its
        oldest turns (a sliding window that keeps the system message and starts at a user turn);
        a single message longer than the window keeps its end."""
        ids = self._template(messages)
        n_sys = 1 if messages and messages[0].get("role") == "system" else 0
        rest = list(messages[n_sys:])
        while ids.shape[1] > self.max_input_tokens and len(rest) > 1:
            rest = rest[1:]
            while len(rest) > 1 and rest[0].get("role") != "user":
                rest = rest[1:]
            ids = self._template(list(messages[:n_sys]) + rest)
        return ids[:, -self.max_input_tokens :].to(self._lm.device)

    def __call__(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        torch = require("torch", "the local judge")
        with self._lock:
            self.load()
            ids = self._prompt_ids(messages)
            temperature = float(params.get("temperature") or 0.0)
            seed = params.get("seed")
            if params.get("guided_choice"):
                return self._choose(ids, list(params["guided_choice"]), temperature, seed)
            kwargs: dict[str, Any] = {"max_new_tokens": int(params.get("max_tokens") or 512),
                                      "pad_token_id": self._tok.pad_token_id,
                                      "attention_mask": torch.ones_like(ids)}
            if temperature > 0:
                torch.manual_seed(int(seed) if seed is not None else 0)
                kwargs.update(do_sample=True, temperature=temperature, top_p=1.0)
            else:
                kwargs.update(do_sample=False)
            with torch.no_grad():
                out = self._lm.generate(ids, **kwargs)
            return str(self._tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    def choice_tokens(self, choices: list[str]) -> list[list[int]]:
        """Token ids of each allowed reply, as the model would write them after the prompt."""
        self.load()
        return [list(self._tok(c, add_special_tokens=False)["input_ids"]) for c in choices]

    def _choose(self, ids: Any, choices: list[str], temperature: float, seed: int | None) -> str:
        """Decode restricted to ``choices``: at each step only tokens that keep the reply a prefix of
        an allowed string are eligible (plus EOS where a choice is complete); greedy at temperature
        0, else sampled from the renormalised eligible tokens with a seeded generator. The model
        runs only where there is a choice to make: forced tokens are fed in one pass with the
        next decision's input, through the KV cache."""
        torch = require("torch", "the local judge")
        toks = self.choice_tokens(choices)
        eos = self._tok.eos_token_id
        gen = torch.Generator().manual_seed(int(seed) if seed is not None else 0)
        from curate.features.lm import cache_argument

        cache_arg = cache_argument(self._lm)
        alive = list(range(len(choices)))
        prefix: list[int] = []
        pending: list[int] = ids[0].tolist()  # tokens not yet fed to the model
        past: Any = None
        with torch.no_grad():
            while True:
                if len(alive) == 1:  # one string left: the rest of it is forced
                    return choices[alive[0]]
                done = [i for i in alive if len(toks[i]) == len(prefix)]
                nxt = sorted({toks[i][len(prefix)] for i in alive if len(toks[i]) > len(prefix)})
                if not nxt:  # several choices with the same tokens
                    return choices[done[0]]
                options = nxt + ([eos] if done and eos is not None else [])
                if len(options) == 1:
                    pick = options[0]
                else:
                    kwargs = {} if past is None else {cache_arg: past}
                    out = self._lm(torch.tensor([pending], device=ids.device), use_cache=True, **kwargs)
                    past, pending = getattr(out, cache_arg), []
                    sub = out.logits[0, -1].double()[torch.tensor(options, device=ids.device)]
                    if temperature > 0:
                        probs = torch.softmax(sub / temperature, dim=0).cpu()
                        pick = options[int(torch.multinomial(probs, 1, generator=gen))]
                    else:
                        pick = options[int(torch.argmax(sub))]  # first maximum: ties go to the lower id
                if done and pick == eos:
                    return choices[done[0]]
                prefix.append(pick)
                pending.append(pick)
                alive = [i for i in alive if len(toks[i]) >= len(prefix) and toks[i][len(prefix) - 1] == pick]


def serve(model: str = "default", *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          served_name: str | None = None) -> None:
    """Serve a local causal LM until interrupted (blocking); the ``curate judge serve`` verb."""
    uvicorn = require("uvicorn", "curate judge serve")
    backend = LMBackend(model, device=device).load()
    name = served_name or ("smollm2-135m-instruct" if model == "default" else str(model))
    uvicorn.run(make_app({name: backend}), host=host, port=port, log_level="info", access_log=False)
