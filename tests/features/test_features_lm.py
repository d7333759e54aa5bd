"""Causal-LM loading and response-masked encoding (spec §2, §11.1)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("torch")

from curate.errors import ParameterError, SchemaError  # noqa: E402
from curate.features.lm import IGNORE, encode_examples, load_causal_lm  # noqa: E402
from curate.features.tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from curate.schema import make_record, to_frame  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _labelled(tok, e):
    return tok.decode([t for t in e.labels if t != IGNORE])


def test_mask_covers_exactly_assistant_turns(tok):
    rec = make_record("sft", messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": "bye"}])
    e_all, = encode_examples([rec], tok)
    assert _labelled(tok, e_all) == "hello<|im_end|>\nbye<|im_end|>\n"
    assert tok.decode(e_all.input_ids) == tok.apply_chat_template(rec["messages"], tokenize=False)
    e_last, = encode_examples([rec], tok, train_on="last_assistant_turn")
    assert _labelled(tok, e_last) == "bye<|im_end|>\n"
    assert e_last.n_response == len("bye") + 2 and not e_last.truncated
    assert e_all["input_ids"] == e_all.input_ids  # mapping access for curate.influence


def test_kinds_and_fields(tok):
    pref = make_record("preference", prompt=[{"role": "user", "content": "q"}],
                       chosen=[{"role": "assistant", "content": "good"}], rejected=[{"role": "assistant", "content": "bad"}])
    tgt = make_record("target", messages=[{"role": "user", "content": "2+2?"}], answer="4", task="math")
    table = to_frame([pref, tgt])
    a, b = encode_examples(table, tok)
    assert _labelled(tok, a) == "good<|im_end|>\n" and _labelled(tok, b) == "4<|im_end|>\n"
    r, = encode_examples([pref], tok, field="rejected")
    assert _labelled(tok, r) == "bad<|im_end|>\n"
    with pytest.raises(SchemaError, match="preference"):
        encode_examples([tgt], tok, field="chosen")
    with pytest.raises(ParameterError, match="'field' parameter"):
        encode_examples([tgt], tok, field="answer")


def test_truncation_rules(tok):
    rec = make_record("sft", messages=[{"role": "user", "content": "p" * 30}, {"role": "assistant", "content": "r" * 40}])
    full, = encode_examples([rec], tok)
    n_prompt = full.labels.index(next(t for t in full.labels if t != IGNORE))
    # 1. enough room: cut the end of the response
    e, = encode_examples([rec], tok, max_length=n_prompt + 20, min_response_tokens=16)
    assert e.truncated and len(e.input_ids) == n_prompt + 20 and e.n_response == 20
    assert e.input_ids == full.input_ids[: n_prompt + 20]
    # 2. prompt leaves < 16 response positions: drop prompt tokens from the left instead
    e, = encode_examples([rec], tok, max_length=n_prompt + 4, min_response_tokens=16)
    assert e.truncated and len(e.input_ids) == n_prompt + 4 and e.n_response == 16
    assert e.input_ids == full.input_ids[12 : n_prompt + 16]
    # 3. nothing left to learn from
    empty = make_record("target", messages=[{"role": "user", "content": "no answer known"}])
    e, = encode_examples([empty], tok)
    assert e.n_response == 0 and all(t == IGNORE for t in e.labels)


def test_template_prefix_check_raises(tok):
    broken = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant:\n{% endif %}")
    bad = tiny_tokenizer(chat_template=broken)
    rec = make_record("sft", messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    with pytest.raises(SchemaError, match=rec["uid"]):
        encode_examples([rec], bad)


def test_alpaca_fallback_without_template():
    plain = tiny_tokenizer(chat_template=None)
    rec = make_record("sft", messages=[{"role": "user", "content": "do it"}, {"role": "assistant", "content": "done"}])
    e, = encode_examples([rec], plain)
    assert _labelled(plain, e) == "done<|im_end|>"
    assert "### Instruction:\ndo it" in plain.decode(e.input_ids)


def test_load_local_folder_and_errors(tmp_path, tok):
    tiny_llama(vocab_size=len(tok), dtype="float32").save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm, tk = load_causal_lm(str(tmp_path), device="cpu")
    assert not lm.training and tk.pad_token is not None and tk.padding_side == "right"
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(ParameterError, match="'dtype'"):
        load_causal_lm(str(tmp_path), dtype="int8")


@pytest.mark.slow
def test_default_model_cached_and_fast():
    from curate.features.lm import default_model_path

    path = default_model_path()  # converts once (about a minute) on a fresh cache
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    t = time.perf_counter()
    lm, tk = load_causal_lm("default", device="cpu")
    elapsed = time.perf_counter() - t
    assert default_model_path() == path
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.vocab_size == 49152
    assert tk.pad_token is not None
    print(f"default SmolLM2 load: {elapsed:.2f} s")
    rec = make_record("sft", messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    e, = encode_examples([rec], tk)
    assert tk.decode([t for t in e.labels if t != IGNORE]) == "Hello!<|im_end|>\n"


@pytest.mark.slow
def test_default_model_cache_without_tokenizer_is_repaired(tmp_path, monkeypatch):
    from curate.features.lm import default_model_path

    src = default_model_path()
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    old = tmp_path / "models" / src.name
    old.mkdir(parents=True)
    for f in ("config.json", "generation_config.json", "DONE"):
        (old / f).write_bytes((src / f).read_bytes())
    (old / "model.safetensors").symlink_to(src / "model.safetensors")
    assert default_model_path() == old  # same folder, tokenizer written into it once
    assert (old / "tokenizer.json").exists() and (old / "tokenizer_config.json").exists()
    _, tk = load_causal_lm("default", device="cpu")
    _, ref = load_causal_lm(str(src), device="cpu")
    text = "Hello, world! <|im_start|>user\nWhat is 2+2?<|im_end|>"
    assert tk(text)["input_ids"] == ref(text)["input_ids"] and tk.chat_template == ref.chat_template


@pytest.mark.slow
def test_response_starting_with_newline_keeps_a_clean_boundary_on_the_real_tokenizer():
    # Regression: tokenising the whole rendering merged "\n" + "\n..." across the prompt/response
    # boundary of SmolLM2's ChatML, so real Alpaca rows whose output starts with a newline failed.
    from curate.features.lm import encode_examples, load_causal_lm
    from curate.schema import make_record, to_frame

    _, tok = load_causal_lm("default", device="cpu")
    table = to_frame([make_record("sft", messages=[{"role": "user", "content": "Write a poem."},
                                                   {"role": "assistant", "content": "\n\nRoses are red.\n"}])])
    (enc,) = encode_examples(table, tok, max_length=128, min_response_tokens=1)
    labelled = [t for t in enc.labels if t != -100]
    assert "Roses are red." in tok.decode(labelled)
    assert "Write a poem" not in tok.decode(labelled)


def test_loading_prints_no_transformers_bars_off_a_terminal(tmp_path, capfd) -> None:
    """run.log and piped output stay free of transformers' "Loading weights" bars; the global
    setting is restored afterwards."""
    import transformers

    from curate.features.lm import load_causal_lm
    from curate.features.tiny import tiny_llama, tiny_tokenizer

    tiny_llama(dtype="float32").save_pretrained(str(tmp_path))
    tiny_tokenizer().save_pretrained(str(tmp_path))
    capfd.readouterr()
    assert transformers.utils.logging.is_progress_bar_enabled()
    load_causal_lm(str(tmp_path), device="cpu")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err
    assert transformers.utils.logging.is_progress_bar_enabled()
