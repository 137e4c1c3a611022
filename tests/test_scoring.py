"""Batched scoring equals the plain one-pair-at-a-time computation."""

from __future__ import annotations

import pytest
import torch

from mainlib.data import Pair
from mainlib.models import LoraSettings, add_lora, load_model
from mainlib.prompts import encode
from mainlib.scoring import ScoringSettings, score_pairs

PAIRS = [
    Pair("Name a fruit.", "An apple."),
    Pair("Write a short greeting for a letter to a friend.", "Dear friend, I hope you are well and happy."),
    Pair("Say yes.", "Yes."),
    Pair("Describe the sea in a few words, please, in a calm and quiet voice.", "Vast, blue and restless."),
    Pair("Count to three.", "One, two, three."),
]


def naive_scores(model, tokenizer, direction, pairs, unconditional=False):
    """One pair at a time, full logits, no batching: the reference."""
    out = []
    for p in pairs:
        instruction = "" if unconditional and direction == "forward" else p.instruction
        response = "" if unconditional and direction == "reverse" else p.response
        enc = encode(tokenizer, direction, instruction, response)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        targets = torch.tensor(enc.input_ids[1:])
        rows = torch.arange(enc.prompt_len - 1, len(enc.input_ids) - 1)
        out.append(logp[rows, targets[rows]].tolist())
    return out


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("unconditional", [False, True])
def test_batched_equals_naive(tiny_model_dir, tiny_tokenizer, direction, unconditional) -> None:
    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_model_dir), "none"), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a non-zero adapter, to check that scoring goes through the LoRA layers
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    settings = ScoringSettings(token_budget=120, max_batch_size=3, head_chunk=7)  # several batches and chunks
    batched = score_pairs(model, tiny_tokenizer, direction, PAIRS, settings, unconditional=unconditional)
    reference = naive_scores(model, tiny_tokenizer, direction, PAIRS, unconditional)
    for got, want in zip(batched, reference, strict=True):
        assert len(got.logprobs) == len(want)
        assert max(abs(a - b) for a, b in zip(got.logprobs, want, strict=True)) < 1e-4
        assert got.mean == pytest.approx(sum(want) / len(want), abs=1e-4)
