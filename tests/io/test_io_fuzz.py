"""Generated malformed records through `curate ingest`: every one exits 2 naming file:line and
writes nothing; with --on-error skip it lands in the rejected file and its neighbours are kept.

Each case is a three-record file (good, bad, good) so the format is detected from a good record
and the bad one is always at record 2. Mutations: truncated text, wrongly typed required fields,
deep nesting, bad and lone-surrogate escapes, integer literals over Python's digit limit.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import polars as pl
import pytest

from curate.cli import main

N_PER_SHAPE = 240
SKIP_EVERY = 4  # every 4th block of six JSONL cases also runs with --on-error skip

HH_C = "\n\nHuman: how are you?\n\nAssistant: fine, thanks"
HH_R = "\n\nHuman: how are you?\n\nAssistant: go away"
# shape -> (kind, good record, paths of required fields, paths where None is allowed)
SHAPES: dict[str, tuple[str, dict[str, Any], list[tuple], set[tuple]]] = {
    "alpaca": ("sft", {"instruction": "add 2 and 2", "input": "x", "output": "4"},
               [("instruction",), ("input",), ("output",)], {("input",)}),
    "sharegpt": ("sft", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                 [("conversations",), ("conversations", 0, "value"), ("conversations", 1, "value"),
                  ("conversations", 0, "from"), ("conversations", 1)], set()),
    "messages": ("sft", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                 [("messages", 0, "content"), ("messages", 1, "content"), ("messages", 1, "role"),
                  ("messages", 0)], set()),
    "trl": ("preference", {"prompt": "p", "chosen": "good", "rejected": "bad"},
            [("prompt",), ("chosen",), ("rejected",)], set()),
    "hh_rlhf": ("preference", {"chosen": HH_C, "rejected": HH_R}, [("chosen",), ("rejected",)], set()),
    "gsm8k": ("target", {"question": "what is 2+2?", "answer": "2+2=4 #### 4"}, [("question",), ("answer",)], set()),
}
WRONG = [5, -1.5, True, {"k": "v"}, [1, 2], None]


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _set(obj: Any, path: tuple, value: Any) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _string_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, str):
        return [path]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _string_paths(v, (*path, k))]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _string_paths(v, (*path, i))]
    return []


def _deep(rng: random.Random) -> str:
    """JSON text of a value nested 130 to 5,000 levels (built as text: json.dumps would recurse)."""
    opens = [rng.choice(['[', '{"k": ']) for _ in range(rng.randint(130, 5000))]
    return "".join(opens) + '"leaf"' + "".join("]" if o == "[" else "}" for o in reversed(opens))


def _huge(rng: random.Random) -> str:
    return ("-" if rng.random() < 0.3 else "") + "9" + "".join(rng.choice("0123456789") for _ in range(rng.randint(4301, 6000)))


def _bad_record(shape: str, rng: random.Random, i: int) -> tuple[str, str]:
    """(mutation name, JSON text of one malformed record)."""
    _, good, required, nullable = SHAPES[shape]
    rec = copy.deepcopy(good)
    kind = ["truncate", "wrong_type", "deep", "bad_escape", "surrogate", "huge"][i % 6]
    if kind == "truncate":
        text = json.dumps(rec)
        return kind, text[: rng.randint(1, len(text) - 1)]
    if kind == "wrong_type":
        path = rng.choice(required)
        choices = [w for w in WRONG if not (w is None and path in nullable)]
        _set(rec, path, rng.choice(choices))
        return kind, json.dumps(rec)
    if kind in ("deep", "huge"):
        marker = "\x00VALUE\x00"
        if rng.random() < 0.5:
            _set(rec, rng.choice(required), marker)
        else:
            rec["extra"] = {"n": marker}
        return kind, json.dumps(rec).replace(json.dumps(marker), _deep(rng) if kind == "deep" else _huge(rng))
    path = rng.choice(_string_paths(rec))
    s = _get(rec, path)
    cut = rng.randint(0, len(s))
    if kind == "surrogate":
        lone = chr(rng.randint(0xD800, 0xDFFF))
        _set(rec, path, s[:cut] + lone + s[cut:])
        return kind, json.dumps(rec)  # ensure_ascii writes the lone surrogate as a \\uXXXX escape
    marker = "\x00ESC\x00"
    _set(rec, path, s[:cut] + marker + s[cut:])
    bad = rng.choice(["\\x41", "\\u12g4", "\\q", "\\u0z", "\\ "])
    return kind, json.dumps(rec).replace(json.dumps(marker)[1:-1], bad)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_io_fuzz_malformed_records_exit_2_with_place(shape, tmp_path, capsys):
    kind, good, _, _ = SHAPES[shape]
    rng = random.Random(f"fuzz-{shape}")
    good2 = json.dumps(good).replace('"q"', '"q2"').replace("2+2", "3+3").replace("good", "fine")
    seen: dict[str, int] = {}
    for i in range(N_PER_SHAPE):
        mutation, bad = _bad_record(shape, rng, i)
        seen[mutation] = seen.get(mutation, 0) + 1
        block = i // 6  # mutations cycle with period 6: whole blocks alternate container and mode
        container = "json" if mutation != "truncate" and block % 2 else "jsonl"
        src = tmp_path / f"{shape}_{i}.{container}"
        if container == "jsonl":
            src.write_text("\n".join([json.dumps(good), bad, good2]) + "\n", encoding="utf-8")
        else:
            src.write_text("[\n" + ",\n".join([json.dumps(good), bad, good2]) + "\n]\n", encoding="utf-8")
        out = tmp_path / f"out_{i}.parquet"
        rc = main(["ingest", str(src), "-o", str(out), "--kind", kind])
        err = capsys.readouterr().err
        case = f"{shape} #{i} {mutation} ({container}): {bad[:200]!r}"
        assert rc == 2, f"{case}\nexit {rc}: {err}"
        assert f"{src}:2" in err or (container == "json" and f"{src}:3" in err), f"{case}\n{err}"
        assert "internal error" not in err and not out.exists(), case
        if container == "jsonl" and block % SKIP_EVERY == 0:
            rc = main(["ingest", str(src), "-o", str(out), "--kind", kind, "--on-error", "skip"])
            err = capsys.readouterr().err
            assert rc == 0, f"{case}\nskip: exit {rc}: {err}"
            rej = pl.read_parquet(tmp_path / f"out_{i}.rejected.parquet")
            assert rej["source_line"].to_list() == [2], case
            assert pl.read_parquet(out)["source_line"].to_list() == [1, 3], case
            out.unlink()
            (tmp_path / f"out_{i}.rejected.parquet").unlink()
        src.unlink()
    assert len(seen) == 6 and min(seen.values()) >= N_PER_SHAPE // 6
