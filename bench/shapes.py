"""Random-weight Llama shapes, built from a config and saved once (safetensors + a stand-in tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mainlib.paths import cache_dir

# The published shapes of Llama-3.2-1B and Llama-2-7B, and a tiny one for CPU smoke runs.
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(  # the bundled model's shape: what a CPU run can afford
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,  # a multiple of 64: bitsandbytes' 4-bit blocks stay whole
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
PAD_ID, EOS_ID = 0, 1  # the stand-in tokenizer's special tokens; random data avoids both


def stand_in_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with one token per id ("t0", "t1", ...): the trainers need pad/EOS ids, not text."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t2"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=f"t{PAD_ID}", eos_token=f"t{EOS_ID}", unk_token="t2"
    )


def build_shape(name: str, root: Path | None = None) -> Path:
    """Save a random-weight model of shape `name` (bf16) with its stand-in tokenizer, once; return the folder."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    out = (root or cache_dir() / "bench") / name
    if (out / "config.json").is_file():
        return out
    config = LlamaConfig(
        **SHAPES[name], max_position_embeddings=4096, pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: half the host memory and time of fp32 for 7B
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    stand_in_tokenizer(config.vocab_size).save_pretrained(tmp)
    tmp.rename(out)
    return out
