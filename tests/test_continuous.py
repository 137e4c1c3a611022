"""Continuous batching (mainlib.continuous, mainlib.lm): the same greedy tokens as HF `generate`, the same
responses as lm-eval's own `HFLM`, stop strings and EOS honoured, every prompt answered once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mainlib import models
from mainlib.continuous import greedy_generate

PROMPTS = [
    "Write a poem about the sea.",
    "List three fruits.",
    "Explain why the sky is blue in one long paragraph with many details about light and air.",
    "Hi",
    "Give me a recipe for bread, step by step, with the amounts of flour, water, salt and yeast.",
    "Translate 'good morning' into French.",
    "What is 2 + 2?",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    torch.manual_seed(0)
    model = models.load_model(str(tiny_model_dir), "none").eval()
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    return model, tokenizer, ids


def reference(model, tokenizer, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """HF greedy generate, one prompt at a time (no padding), up to and including EOS."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_same_tokens_as_hf_generate(tiny, slots: int) -> None:
    model, tokenizer, ids = tiny
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    done = []
    out = greedy_generate(
        model, ids, 24, {eos}, tokenizer.pad_token_id, slots=slots, on_done=lambda i, t: done.append(i)
    )
    assert sorted(done) == list(range(len(ids)))  # every prompt finished exactly once
    for prompt, tokens in zip(ids, out, strict=True):
        assert tokens == reference(model, tokenizer, prompt, 24, eos)


def test_stops_at_eos_and_stop_strings(tiny) -> None:
    model, tokenizer, ids = tiny
    free = greedy_generate(model, ids, 16, set(), tokenizer.pad_token_id, slots=4, progress=False)
    assert all(len(t) == 16 for t in free)
    eos = free[0][5]  # pretend a token of the first answer is EOS: it stops at its first use and keeps it
    out = greedy_generate(model, ids, 16, {eos}, tokenizer.pad_token_id, slots=4, progress=False)
    assert out[0] == free[0][: free[0].index(eos) + 1]
    assert all(t == f[: f.index(eos) + 1] if eos in f else t == f for t, f in zip(out, free, strict=True))
    marker = free[2][3]
    stopped = greedy_generate(
        model, ids, 16, set(), tokenizer.pad_token_id, slots=4, stop=lambda t: t[-1] == marker, progress=False
    )
    assert stopped[2] == free[2][: free[2].index(marker) + 1]


@pytest.mark.slow
def test_lm_eval_responses_equal_hflm(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The same IFEval and GSM8K (stop strings, few-shot chat) responses as lm-eval's own generate_until."""
    import json

    from mainlib.evaluate import compare

    settings = dict(limit=4, batch_size=2, data="bundled", quantization="none", max_gen_toks=12)
    for slots in (0, 5):
        compare(str(tiny_model_dir), {"base": None}, ["ifeval", "gsm8k"], generation_slots=slots,
                samples_dir=str(tmp_path / str(slots)), results_dir=tmp_path, **settings)  # fmt: skip
    for task in ("ifeval", "gsm8k"):
        stock, ours = (
            [json.loads(line)["resps"] for line in (tmp_path / s / f"{tiny_model_dir.name}__{task}.jsonl").open()]
            for s in ("0", "5")
        )
        assert stock == ours and len(stock) >= 4
