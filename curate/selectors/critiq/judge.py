"""LLM judges for CritiQ: the :class:`Judge` protocol, an OpenAI-compatible HTTP client, the
SQLite response cache and :class:`JudgeSession` (cache + call accounting + strict JSON re-asks).

Implements docs/methods/critiq.md §4 and §6 (CritiQ: "Mining Data Quality Criteria from Human
Preferences", Guo et al., ACL 2025, arXiv 2502.19279). Deviations from the reference code:

- retries back off exponentially (1, 2, 4, … s, capped at 60 s, at most 6 tries) instead of
  sleeping 60 s up to 10 times; a ``Retry-After`` header (seconds or an HTTP date) is honoured
  when it asks for longer; a 200 whose body is not a chat completion with a text reply is retried
  like a 5xx (proxies and overloaded servers send those);
- a final parse failure is an ``invalid`` result, never a bare ``None``;
- every call is cached by ``sha256(canonical_json({judge, messages, temperature, max_tokens, seed,
  attempt}))`` (plus ``guided_choice`` when set) so reruns are free and manager sampling
  (temperature 1.0) is reproducible; an HTTP judge's name is ``model@endpoint URL`` (without
  credentials or query), so a reply from one endpoint is never served for another;
- workers may be asked to pick one of the allowed reply strings (constrained decoding), which
  ``curate judge serve`` implements too: a small local model cannot write the JSON contract freely
  (SmolLM2-135M parsed 0 of 200 replies), but it can pick among the valid replies. Servers spell
  the request differently, so the form is a judge setting (``choice_format``, :data:`CHOICE_FORMATS`):
  ``structured_outputs`` (the default: ``{"structured_outputs": {"choice": [...]}}``, vLLM >= 0.12,
  which removed the older key, and ``curate judge serve``), ``guided_choice`` (``{"guided_choice":
  [...]}``, older vLLM), ``response_format`` (an OpenAI JSON-schema string enum, for hosted APIs and
  llama.cpp; the reply is then a JSON string literal, decoded back to the chosen string) or
  ``none`` (no constraint is sent and the judge declares it cannot restrict, so callers fall back to
  free text). The form is not part of the cache key: every constrained form asks the same
  question (the key holds the choice list), so replies cached under one form serve the others.

The API key is read from an environment variable at call time; it is never part of a judge's
``name``, a cache key, a manifest or a log line.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from curate._lazy import require
from curate.errors import param_error
from curate.schema import canonical_json

CACHE_MODES = ("read_write", "read_only", "off")
#: request forms of "reply with one of these strings" (see the module docstring); the first is the default
CHOICE_FORMATS = ("structured_outputs", "guided_choice", "response_format", "none")
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
        max_tries: attempts per call on 429, 5xx, malformed 200 bodies, timeouts and connection errors.
        backoff_s: first back-off; doubles per retry, capped at ``backoff_cap_s``. A ``Retry-After``
            header asking for longer wins, up to ``max_retry_after_s``.
        endpoint: the endpoint's identity in :attr:`name` (and so in cache keys) [default: the base
            URL without credentials, query or fragment]. Give a stable name for a server whose URL
            changes between runs but whose model does not (a local server on a free port).
        choice_format: how a choice list is sent (:data:`CHOICE_FORMATS`): ``structured_outputs``
            (vLLM >= 0.12, ``curate judge serve``), ``guided_choice`` (older vLLM),
            ``response_format`` (JSON-schema string enum: hosted APIs, llama.cpp) or ``none``
            (never constrain; :attr:`supports_guided_choice` is then False).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0, max_concurrency: int = 4, max_tries: int = 6,
                 backoff_s: float = 1.0, backoff_cap_s: float = 60.0, max_retry_after_s: float = 600.0,
                 endpoint: str | None = None, choice_format: str = CHOICE_FORMATS[0]) -> None:
        owner = "OpenAICompatJudge"
        check_choice_format(owner, choice_format)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise param_error(owner, "base_url", "an http(s) URL", base_url)
        if not isinstance(model, str) or not model:
            raise param_error(owner, "model", "a non-empty string", model)
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise param_error(owner, "max_concurrency", "an integer >= 1", max_concurrency)
        if not isinstance(max_tries, int) or max_tries < 1:
            raise param_error(owner, "max_tries", "an integer >= 1", max_tries)
        if isinstance(timeout_s, bool) or not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
                                               and timeout_s > 0):
            raise param_error(owner, "timeout_s", "a finite number of seconds > 0", timeout_s)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"{model}@{endpoint or public_url(self.base_url)}"
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_tries = max_tries
        self.backoff_s = float(backoff_s)
        self.backoff_cap_s = float(backoff_cap_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.max_concurrency = max_concurrency
        self.choice_format = choice_format
        # a judge that sends no constraint must not claim one: callers then ask in free text
        self.supports_guided_choice = choice_format != "none"
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

    #: how back-off waits are taken (tests record them instead of sleeping)
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    def chat(self, messages: list[dict[str, str]], *, temperature: float, max_tokens: int,
             seed: int | None, guided_choice: Sequence[str] | None = None) -> str:
        """One chat completion; retries 429/5xx/timeouts/connection errors with back-off.

        ``guided_choice`` restricts the reply to one of the given strings, sent in the form
        :attr:`choice_format` names (:func:`choice_request`); an endpoint that does not know the form
        answers 400 (a :class:`JudgeError`). With ``response_format`` the reply is decoded from its
        JSON string literal (:func:`choice_reply`).

        Raises:
            JudgeError: another 4xx, or no success after ``max_tries`` (the message names the URL).
        """
        httpx = require("httpx", "the OpenAI-compatible judge client")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature,
                                "max_tokens": max_tokens}
        if seed is not None:
            body["seed"] = seed
        if guided_choice is not None:
            if self.choice_format == "none":
                raise JudgeError(f"judge '{self.name}' has choice_format 'none' and cannot restrict its reply")
            body.update(choice_request(self.choice_format, guided_choice))
        headers = {}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = f"{self.base_url}/chat/completions"
        last = ""
        wait = 0.0  # what the server asked for with Retry-After
        with self._sem:
            for attempt in range(self.max_tries):
                if attempt:
                    self.n_http_retries += 1
                    self.sleep(max(min(self.backoff_cap_s, self.backoff_s * 2 ** (attempt - 1)), wait))
                wait = 0.0
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
                    wait = min(self.max_retry_after_s, retry_after_s(resp.headers.get("retry-after")))
                    continue
                if resp.status_code >= 400:
                    raise JudgeError(f"{url}: HTTP {resp.status_code} for model '{self.model}': {resp.text[:300]}")
                reply = completion_text(resp.content)
                if reply is None:  # a 200 that is not a completion: a proxy or an overloaded server
                    last = f"HTTP {resp.status_code} without a chat completion: {resp.text[:120]!r}"
                    continue
                if guided_choice is not None:
                    return choice_reply(self.choice_format, reply)
                return reply
        raise JudgeError(f"{url}: no answer from model '{self.model}' after {self.max_tries} tries; last: {last}. "
                         "Is the endpoint up and serving that model?")


def check_choice_format(owner: str, value: Any) -> str:
    """``value`` when it is one of :data:`CHOICE_FORMATS`, else a parameter error naming ``owner``."""
    if value not in CHOICE_FORMATS:
        raise param_error(owner, "choice_format", " | ".join(CHOICE_FORMATS), value)
    return str(value)


def choice_request(choice_format: str, choices: Sequence[str]) -> dict[str, Any]:
    """The request-body fields that restrict a reply to ``choices`` in ``choice_format``.

    ``response_format`` uses the OpenAI JSON-schema form with a string enum at the root (accepted
    by vLLM, SGLang, llama.cpp and ``curate judge serve``; strict OpenAI mode wants an object root).
    """
    allowed = list(choices)
    if choice_format == "structured_outputs":
        return {"structured_outputs": {"choice": allowed}}
    if choice_format == "guided_choice":
        return {"guided_choice": allowed}
    if choice_format == "response_format":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": "choice", "schema": {"type": "string", "enum": allowed}}}}
    raise ValueError(f"choice_format {choice_format!r} sends no choice list")


def choice_reply(choice_format: str, reply: str) -> str:
    """The chosen string of a constrained reply. A ``response_format`` reply is a JSON document whose
    value is the string (``'"A"'`` for ``A``); it is decoded, and a reply that is not a JSON
    string is returned unchanged for the caller's parser to judge. Other forms reply with the string itself."""
    if choice_format != "response_format":
        return reply
    try:
        value = json.loads(reply)
    except ValueError:
        return reply
    return value if isinstance(value, str) else reply


def public_url(url: str) -> str:
    """``url`` without user:password, query or fragment (what may appear in names, keys and logs)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def retry_after_s(value: str | None) -> float:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date; RFC 9110
    §10.2.3); 0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return 0.0
        seconds = when.timestamp() - time.time()
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def completion_text(body: bytes) -> str | None:
    """The reply text of a chat-completions response body, or None when the body is not one
    (empty, not JSON, no ``choices``, no string ``message.content``)."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


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
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, judge TEXT, reply TEXT)")
        except sqlite3.Error as exc:  # unwritable place, a file that is not a cache, a full disk
            raise JudgeError(f"cannot open the judge cache {self.path} ({exc}); give a writable --cache file "
                             "or '' for none.") from None

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
                 mode: str = "read_write", *, timeout_s: float = 120.0, retries: int = 5,
                 choice_format: str = CHOICE_FORMATS[0]) -> JudgeSession:
    """A :class:`JudgeSession` over an OpenAI-compatible endpoint (what the verbs and steps use);
    ``retries`` HTTP retries per call (so ``retries + 1`` tries) of ``timeout_s`` seconds each;
    ``choice_format`` as in :class:`OpenAICompatJudge`."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise param_error("judge", "retries", "an integer >= 0", retries)
    return JudgeSession(OpenAICompatJudge(url, model, api_key_env=api_key_env, max_concurrency=concurrency,
                                          timeout_s=timeout_s, max_tries=retries + 1, choice_format=choice_format),
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
