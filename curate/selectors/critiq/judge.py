"""LLM judges for CritiQ: the :class:`Judge` protocol, an OpenAI-compatible HTTP client, the
SQLite response cache and :class:`JudgeSession` (cache + call accounting + strict JSON re-asks).

Implements docs/methods/critiq.md §4 and §6 (CritiQ: "Mining Data Quality Criteria from Human
Preferences", Guo et al., ACL 2025, arXiv 2502.19279). Deviations from the reference code:

- retries back off exponentially (1, 2, 4, … s, capped at 60 s, at most 6 tries) instead of
  sleeping 60 s up to 10 times;
- a final parse failure is an ``invalid`` result, never a bare ``None``;
- every call is cached by ``sha256(canonical_json({judge, messages, temperature, max_tokens, seed,
  attempt}))`` (plus ``guided_choice`` when set) so reruns are free and manager sampling
  (temperature 1.0) is reproducible;
- workers may be asked with vLLM's ``guided_choice`` (the allowed reply strings), which
  ``curate judge serve`` implements too: a small local model cannot write the JSON contract freely
  (SmolLM2-135M parsed 0 of 200 replies), but it can pick among the valid replies.

The API key is read from an environment variable at call time; it is never part of a judge's
``name``, a cache key, a manifest or a log line.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from curate._lazy import require
from curate.errors import param_error
from curate.schema import canonical_json

CACHE_MODES = ("read_write", "read_only", "off")
MAX_NAME_CHARS = 80
T = TypeVar("T")


# --------------------------------------------------------------------------- errors
class JudgeError(RuntimeError):
    """A judge call failed for good (after its retries), or the endpoint refused the request."""


class JudgeParseError(ValueError):
    """A judge reply does not follow the JSON contract of docs/methods/critiq.md §4."""


class CacheMiss(KeyError):
    """``cache_mode="read_only"`` and the call is not in the cache."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BudgetExceeded(RuntimeError):
    """A phase would exceed ``max_llm_calls``; raised before the phase starts."""


# --------------------------------------------------------------------------- protocol
@runtime_checkable
class Judge(Protocol):
    """A chat model. ``name`` (model + settings, never a key) is part of every cache key."""

    name: str

    def chat(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
             seed: int | None) -> str: ...


def supports_guided_choice(judge: Judge) -> bool:
    """Whether ``judge.chat`` takes ``guided_choice=`` (the allowed reply strings)."""
    return bool(getattr(judge, "supports_guided_choice", False))


# --------------------------------------------------------------------------- HTTP client
class OpenAICompatJudge:
    """A judge behind any OpenAI chat-completions endpoint (vLLM, SGLang, llama.cpp server,
    Ollama ``/v1``, hosted APIs, ``curate judge serve``).

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``; requests go to ``{base_url}/chat/completions``.
        model: the model name sent in each request (and the judge's ``name``).
        api_key_env: environment variable holding the API key (sent as a Bearer token when set).
        timeout_s: per-request timeout.
        max_concurrency: at most this many requests in flight from this object.
        max_tries: attempts per call on 429, 5xx, timeouts and connection errors.
        backoff_s: first back-off; doubles per retry, capped at ``backoff_cap_s``.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0, max_concurrency: int = 4, max_tries: int = 6,
                 backoff_s: float = 1.0, backoff_cap_s: float = 60.0) -> None:
        owner = "OpenAICompatJudge"
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise param_error(owner, "base_url", "an http(s) URL", base_url)
        if not isinstance(model, str) or not model:
            raise param_error(owner, "model", "a non-empty string", model)
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise param_error(owner, "max_concurrency", "an integer >= 1", max_concurrency)
        if not isinstance(max_tries, int) or max_tries < 1:
            raise param_error(owner, "max_tries", "an integer >= 1", max_tries)
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise param_error(owner, "timeout_s", "a number > 0", timeout_s)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_tries = max_tries
        self.backoff_s = float(backoff_s)
        self.backoff_cap_s = float(backoff_cap_s)
        self.max_concurrency = max_concurrency
        self._sem = threading.BoundedSemaphore(max_concurrency)
        self._client: Any = None
        self._lock = threading.Lock()
        self.n_http_retries = 0

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICompatJudge(base_url={self.base_url!r}, model={self.model!r})"

    def _http(self) -> Any:
        with self._lock:
            if self._client is None:
                httpx = require("httpx", "the OpenAI-compatible judge client")
                self._client = httpx.Client(timeout=self.timeout_s,
                                            limits=httpx.Limits(max_connections=self.max_concurrency))
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    supports_guided_choice = True

    def chat(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
             seed: int | None, guided_choice: Sequence[str] | None = None) -> str:
        """One chat completion; retries 429/5xx/timeouts/connection errors with back-off.

        ``guided_choice`` (vLLM's extension, also served by ``curate judge serve``) restricts the
        reply to one of the given strings; an endpoint without it answers 400 (a :class:`JudgeError`).

        Raises:
            JudgeError: another 4xx, a malformed response body, or no success after ``max_tries``.
        """
        httpx = require("httpx", "the OpenAI-compatible judge client")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature,
                                "max_tokens": max_tokens}
        if seed is not None:
            body["seed"] = seed
        if guided_choice is not None:
            body["guided_choice"] = list(guided_choice)
        headers = {}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}/chat/completions"
        last = ""
        with self._sem:
            for attempt in range(self.max_tries):
                if attempt:
                    self.n_http_retries += 1
                    time.sleep(min(self.backoff_cap_s, self.backoff_s * 2 ** (attempt - 1)))
                try:
                    resp = self._http().post(url, json=body, headers=headers)
                except httpx.TimeoutException as exc:
                    last = f"timeout after {self.timeout_s:g} s ({type(exc).__name__})"
                    continue
                except httpx.TransportError as exc:
                    last = f"connection error ({type(exc).__name__}: {exc})"
                    continue
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = f"HTTP {resp.status_code}"
                    continue
                if resp.status_code >= 400:
                    raise JudgeError(f"{url}: HTTP {resp.status_code} for model '{self.model}': {resp.text[:300]}")
                try:
                    return str(resp.json()["choices"][0]["message"]["content"])
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise JudgeError(f"{url}: not a chat-completions response: {resp.text[:300]!r}") from exc
        raise JudgeError(f"{url}: no answer from model '{self.model}' after {self.max_tries} tries; last: {last}.")


# --------------------------------------------------------------------------- cache
def cache_key(judge_name: str, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
              seed: int | None, attempt: int, guided_choice: Sequence[str] | None = None) -> str:
    """sha256 of the canonical JSON of everything that determines a reply (docs/methods/critiq.md §6).
    ``guided_choice`` enters only when set, so free-text keys are unchanged."""
    payload: dict[str, Any] = {"judge": judge_name, "messages": messages, "temperature": float(temperature),
                               "max_tokens": int(max_tokens), "seed": seed, "attempt": int(attempt)}
    if guided_choice is not None:
        payload["guided_choice"] = list(guided_choice)
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


class JudgeCache:
    """Judge replies in a SQLite file (WAL mode), keyed by :func:`cache_key`. Thread-safe.

    Every finished call is committed at once, so a crash or a dead endpoint loses nothing done.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, judge TEXT, reply TEXT)")

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put(self, key: str, judge_name: str, reply: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", (key, judge_name, reply))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- session
@dataclass
class CallStats:
    """Calls per phase: ``fresh`` (sent to the judge), ``cached`` (answered by the cache) and
    ``retried`` (re-asks after a parse failure, fresh or cached); ``first`` counts first attempts."""

    fresh: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    cached: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    retried: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    first: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def as_dict(self) -> dict[str, dict[str, int]]:
        phases = sorted(set(self.fresh) | set(self.cached) | set(self.retried) | set(self.first))
        return {p: {"first": self.first.get(p, 0), "fresh": self.fresh.get(p, 0), "cached": self.cached.get(p, 0),
                    "retried": self.retried.get(p, 0)} for p in phases}

    @property
    def n_fresh(self) -> int:
        return sum(self.fresh.values())


class JudgeSession:
    """A judge with its cache, its call accounting and strict-JSON re-asks.

    Args:
        judge: the :class:`Judge`.
        cache: a :class:`JudgeCache`, a path to one, or None (no cache).
        cache_mode: ``read_write`` (default), ``read_only`` (a miss raises :class:`CacheMiss`) or ``off``.
        max_retries: re-asks after a parse failure (so at most ``1 + max_retries`` attempts).
    """

    def __init__(self, judge: Judge, cache: JudgeCache | str | os.PathLike[str] | None = None, *,
                 cache_mode: str = "read_write", max_retries: int = 3) -> None:
        if cache_mode not in CACHE_MODES:
            raise param_error("JudgeSession", "cache_mode", f"one of {list(CACHE_MODES)}", cache_mode)
        if not isinstance(max_retries, int) or max_retries < 0:
            raise param_error("JudgeSession", "max_retries", "an integer >= 0", max_retries)
        self.judge = judge
        self.cache = JudgeCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self.cache_mode = cache_mode if self.cache is not None else "off"
        self.max_retries = max_retries
        self.stats = CallStats()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.judge.name

    def _count(self, table: dict[str, int], phase: str) -> None:
        with self._lock:
            table[phase] += 1

    def chat(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
             seed: int | None = None, attempt: int = 0, phase: str = "",
             guided_choice: Sequence[str] | None = None) -> str:
        """One call through the cache; ``guided_choice`` restricts the reply to those strings.

        Raises:
            JudgeError: ``guided_choice`` is given and the judge does not support it.
        """
        if guided_choice is not None and not supports_guided_choice(self.judge):
            raise JudgeError(f"judge '{self.judge.name}' does not support guided_choice")
        if attempt == 0:
            self._count(self.stats.first, phase)
        else:
            self._count(self.stats.retried, phase)
        key = cache_key(self.judge.name, messages, temperature=temperature, max_tokens=max_tokens,
                        seed=seed, attempt=attempt, guided_choice=guided_choice)
        if self.cache_mode != "off":
            hit = self.cache.get(key)  # type: ignore[union-attr]
            if hit is not None:
                self._count(self.stats.cached, phase)
                return hit
            if self.cache_mode == "read_only":
                raise CacheMiss(f"judge cache {self.cache.path} (read_only) has no reply for a "  # type: ignore[union-attr]
                                f"'{phase}' call to '{self.judge.name}' (key {key[:12]}…).")
        extra = {} if guided_choice is None else {"guided_choice": list(guided_choice)}
        reply = self.judge.chat(messages, temperature=temperature, max_tokens=max_tokens, seed=seed, **extra)
        self._count(self.stats.fresh, phase)
        if self.cache_mode == "read_write":
            self.cache.put(key, self.judge.name, reply)  # type: ignore[union-attr]
        return reply

    def ask_json(self, messages: list[dict[str, str]], parse: Callable[[str], T], *, temperature: float,
                 max_tokens: int, seed: int | None = None, phase: str = "",
                 guided_choice: Sequence[str] | None = None) -> tuple[T | None, str]:
        """Ask, parse; on :class:`JudgeParseError` re-ask the same prompt up to ``max_retries`` times.

        A re-ask is a fresh sample: the attempt index is in the cache key, and re-ask ``k`` sends
        ``seed + k`` (a seeded sampler, e.g. ``curate judge serve`` or vLLM, would otherwise return
        the failed reply again). Greedy decoding (temperature 0) may still repeat itself.

        Returns:
            (parsed value or None when every attempt failed, the last raw reply).
        """
        raw = ""
        for attempt in range(self.max_retries + 1):
            raw = self.chat(messages, temperature=temperature, max_tokens=max_tokens,
                            seed=None if seed is None else seed + attempt, attempt=attempt, phase=phase,
                            guided_choice=guided_choice)
            try:
                return parse(raw), raw
            except JudgeParseError:
                continue
        return None, raw


def open_session(url: str, model: str, cache: str | os.PathLike[str] | None, api_key_env: str, concurrency: int,
                 mode: str = "read_write") -> JudgeSession:
    """A :class:`JudgeSession` over an OpenAI-compatible endpoint (what the verbs and steps use)."""
    return JudgeSession(OpenAICompatJudge(url, model, api_key_env=api_key_env, max_concurrency=concurrency),
                        cache, cache_mode=mode)


# --------------------------------------------------------------------------- parsing (§4)
def extract_json(text: str) -> dict[str, Any]:
    """The JSON object between the first ``{`` and the last ``}`` of ``text``."""
    if not isinstance(text, str):
        raise JudgeParseError(f"reply is not text: {type(text).__name__}")
    i, j = text.find("{"), text.rfind("}")
    if i < 0 or j <= i:
        raise JudgeParseError(f"no JSON object in reply: {text[:120]!r}")
    try:
        obj = json.loads(text[i : j + 1])
    except json.JSONDecodeError as exc:
        raise JudgeParseError(f"malformed JSON in reply: {exc}") from None
    if not isinstance(obj, dict):
        raise JudgeParseError("reply JSON is not an object")
    return obj


@dataclass(frozen=True)
class WorkerResult:
    """One worker judgment. ``vote`` is "A", "B" or None; ``status`` ok | abstain | invalid."""

    vote: str | None
    status: str
    thought: str = ""
    raw: str = ""


def parse_worker(text: str) -> WorkerResult:
    """Worker reply → :class:`WorkerResult` (first character of ``answer``: A, B or N)."""
    obj = extract_json(text)
    answer = obj.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise JudgeParseError("worker reply has no 'answer' string")
    first = answer.strip()[0].upper()
    if first not in ("A", "B", "N"):
        raise JudgeParseError(f"worker answer must be A, B or None, got {answer!r}")
    thought = obj.get("thought", "")
    thought = thought if isinstance(thought, str) else json.dumps(thought)
    if first == "N":
        return WorkerResult(None, "abstain", thought, text)
    return WorkerResult(first, "ok", thought, text)


def parse_criteria(text: str) -> dict[str, str]:
    """Manager propose/refine reply → ``{name: description}`` (non-empty strings, names ≤ 80 chars)."""
    obj = extract_json(text)
    if not obj:
        raise JudgeParseError("empty criteria object")
    out: dict[str, str] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not k.strip() or len(k.strip()) > MAX_NAME_CHARS:
            raise JudgeParseError(f"bad criterion name {k!r}")
        if not isinstance(v, str) or not v.strip():
            raise JudgeParseError(f"criterion {k!r} has no description")
        out[k.strip()] = v.strip()
    return out


def parse_reflection(text: str) -> dict[str, str]:
    """Reflection reply → ``{"analysis": str, "critique": str}`` (critique non-empty)."""
    obj = extract_json(text)
    critique = obj.get("critique")
    if not isinstance(critique, str) or not critique.strip():
        raise JudgeParseError("reflection has no 'critique'")
    analysis = obj.get("analysis", "")
    return {"analysis": analysis if isinstance(analysis, str) else json.dumps(analysis), "critique": critique.strip()}


def parse_choice(text: str) -> WorkerResult:
    """Single-prompt reply (§3 ablation / vanilla judge): like :func:`parse_worker`."""
    return parse_worker(text)
