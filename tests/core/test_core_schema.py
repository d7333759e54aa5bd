"""The canonical table: golden uids, NFC, record validation, text views, validate_table."""

from __future__ import annotations

import hashlib

import polars as pl
import pytest

from curate.errors import SchemaError
from curate.schema import (
    SCHEMA,
    canonical_json,
    dedupe_uids,
    make_record,
    texts,
    to_frame,
    uid,
    validate_table,
)

GOLDEN_SFT = {"kind": "sft", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}


def test_canonical_json_is_sorted_compact_and_keeps_utf8():
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'


def test_uid_golden_value():
    # Pinned: changing the canonical form changes every id users have stored.
    text = '{"kind":"sft","messages":[{"content":"hi","role":"user"},{"content":"Hello!","role":"assistant"}]}'
    assert canonical_json(GOLDEN_SFT) == text
    assert uid(GOLDEN_SFT) == hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def test_uid_pinned_literal():
    assert uid({"kind": "sft", "messages": [{"role": "user", "content": "hi"}]}) == "e645f6ea8c8fb8a4e7bd0c84600e6fc4"


def test_uid_is_nfc_invariant_and_content_sensitive():
    composed = {"kind": "sft", "messages": [{"role": "user", "content": "caf\u00e9"}]}
    decomposed = {"kind": "sft", "messages": [{"role": "user", "content": "cafe\u0301"}]}
    assert uid(composed) == uid(decomposed)
    assert uid(composed) != uid({"kind": "sft", "messages": [{"role": "user", "content": "cafe"}]})


def test_make_record_uid_ignores_source_and_user_id():
    a = make_record("sft", messages=GOLDEN_SFT["messages"], source="a.json", source_line=1, source_id=7)
    b = make_record("sft", messages=GOLDEN_SFT["messages"], source="b.jsonl", source_line=99, source_id="x")
    assert a["uid"] == b["uid"] == uid(GOLDEN_SFT)
    assert a["source_id"] == "7"


def test_role_aliases_are_canonicalised():
    rec = make_record("sft", messages=[{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}])
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "sft", "messages": []}, "messages"),
        ({"kind": "sft", "messages": [{"role": "user", "content": "only a question"}]}, "messages"),
        ({"kind": "sft", "messages": [{"role": "user", "content": 3}]}, "messages[0]"),
        ({"kind": "sft", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"kind": "preference", "prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": []}, "chosen"),
        ({"kind": "nonsense"}, "kind"),
    ],
)
def test_bad_records_name_the_field_and_place(kwargs, field):
    kind = kwargs.pop("kind")
    with pytest.raises(SchemaError) as info:
        make_record(kind, source="data.jsonl", source_line=12, **kwargs)
    assert info.value.field == field or field in str(info.value)
    assert "data.jsonl:12" in str(info.value)


def test_dedupe_uids_keeps_first_and_is_deterministic():
    recs = [make_record("sft", messages=GOLDEN_SFT["messages"]) for _ in range(3)]
    dedupe_uids(recs)
    ids = [r["uid"] for r in recs]
    assert ids[0] == uid(GOLDEN_SFT) and len(set(ids)) == 3
    again = [make_record("sft", messages=GOLDEN_SFT["messages"]) for _ in range(3)]
    dedupe_uids(again)
    assert [r["uid"] for r in again] == ids


def _table() -> pl.DataFrame:
    return to_frame(
        [
            make_record("sft", messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                                         {"role": "assistant", "content": "A1"}]),
            make_record("preference", prompt=[{"role": "user", "content": "Q2"}],
                        chosen=[{"role": "assistant", "content": "good"}], rejected=[{"role": "assistant", "content": "bad"}]),
            make_record("target", task="gsm8k", messages=[{"role": "user", "content": "Q3"}], answer="42"),
        ]
    )


def test_to_frame_has_exact_schema_and_validates():
    t = _table()
    assert dict(t.schema) == SCHEMA
    validate_table(t)


def test_text_views():
    t = _table()
    assert texts(t, "prompt") == ["S\n\nQ1", "Q2", "Q3"]
    assert texts(t, "response") == ["A1", "good", "42"]
    assert texts(t, "rejected")[1] == "bad"
    assert texts(t, "prompt+response")[0] == "S\n\nQ1\n\nA1"
    with pytest.raises(SchemaError):
        texts(t, "nope")


def test_validate_table_names_missing_and_mistyped_columns_and_duplicate_uids():
    t = _table()
    with pytest.raises(SchemaError, match="'task'"):
        validate_table(t.drop("task"))
    with pytest.raises(SchemaError, match="source_line"):
        validate_table(t.with_columns(pl.col("source_line").cast(pl.Utf8)))
    with pytest.raises(SchemaError, match="duplicated uids"):
        validate_table(pl.concat([t, t.head(1)]))
