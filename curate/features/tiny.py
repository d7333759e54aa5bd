"""Tiny causal LMs and a byte-level tokenizer built in code, for tests and examples.

Nothing is downloaded: the tokenizer maps each UTF-8 byte to one token (no merges) plus ChatML
special tokens, and the models are randomly initialised (seeded) Llama / GPT-2 configurations small
enough for float64 exactness tests in milliseconds.
"""

from __future__ import annotations

import types
from typing import Any

from curate._lazy import require

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ("<|im_start|>", "<|im_end|>", "<pad>")


def tiny_tokenizer(chat_template: str | None = CHATML) -> Any:
    """Byte-level tokenizer (256 byte tokens + ``<|im_start|>``, ``<|im_end|>`` (EOS), ``<pad>``)."""
    tk = require("tokenizers", "the tiny test tokenizer")
    tr = require("transformers", "the tiny test tokenizer")
    alphabet = sorted(tk.pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    fast = tr.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                      pad_token="<pad>")
    fast.chat_template = chat_template
    fast.padding_side = "right"
    return fast


def tiny_llama(*, vocab_size: int = 259, hidden: int = 16, layers: int = 2, heads: int = 2, kv_heads: int = 1,
               intermediate: int = 24, dtype: str = "float64", seed: int = 0) -> Any:
    """A seeded random ``LlamaForCausalLM`` (eager attention, eval mode)."""
    torch = require("torch", "tiny test models")
    tr = require("transformers", "tiny test models")
    cfg = tr.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=vocab_size - 1,
                         attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tr.LlamaForCausalLM(cfg)
    model.to(getattr(torch, dtype))
    if dtype == "float64":  # LlamaRMSNorm upcasts to float32; keep float64 exact end to end
        for mod in model.modules():
            if type(mod).__name__ == "LlamaRMSNorm":
                mod.forward = types.MethodType(_rms_norm_forward, mod)
    model.eval()
    return model


def _rms_norm_forward(self: Any, x: Any) -> Any:
    torch = require("torch", "tiny test models")
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def tiny_gpt2(*, vocab_size: int = 259, hidden: int = 16, layers: int = 2, heads: int = 2, dtype: str = "float64",
              seed: int = 0) -> Any:
    """A seeded random ``GPT2LMHeadModel`` (Conv1D projections, eager attention, eval mode)."""
    torch = require("torch", "tiny test models")
    tr = require("transformers", "tiny test models")
    cfg = tr.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
                        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tr.GPT2LMHeadModel(cfg)
    model.to(getattr(torch, dtype))
    model.eval()
    return model
