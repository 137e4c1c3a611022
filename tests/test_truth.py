"""Truth alignment: ROUGE-L on hand-made strings, the true instruction's likelihood as `scoring` gives it."""

from __future__ import annotations

import math

import pytest

from mainlib import data
from mainlib.data import Pair
from mainlib.models import load_model
from mainlib.scoring import score_pairs
from mainlib.truth import reference_instructions, rouge_l, true_instruction_loglik


def test_rouge_l_identical_disjoint_and_known_lcs() -> None:
    synthetic = [
        "How many apples does Tom have?",
        "Write a poem.",
        "the cat sat on the mat",  # LCS with the truth: the, cat, on, mat = 4 of 6 tokens each side
        "how many apples",  # LCS 3: precision 3/3, recall 3/6, F = 2·1·½ / 1.5 = 2/3
        "HOW many apples, does Tom have",  # lower-cased, punctuation dropped: the same tokens
    ]
    true = [
        "How many apples does Tom have?",
        "Compute 2 + 3.",
        "the cat lay on a mat",
        "how many apples does tom have",
        "How many apples does Tom have?",
    ]
    assert rouge_l(synthetic, true) == pytest.approx([1.0, 0.0, 2 / 3, 2 / 3, 1.0])
    with pytest.raises(ValueError):
        rouge_l(["one"], ["one", "two"])


def test_reference_instructions_of_the_bundled_pool() -> None:
    truth = reference_instructions()
    pool = data.load_bundled("unlabeled")
    assert len(truth) == len(pool) == 500 and all(p.source in truth for p in pool)
    assert truth["gsm8k_train:5"].startswith("Mark has a garden with flowers.")


def test_true_instruction_loglik_is_the_reverse_score(tiny_model_dir, tiny_tokenizer) -> None:
    model = load_model(str(tiny_model_dir), "none")
    responses = ["There are 3 + 4 = 7 apples.\nThe final answer is 7.", "Paris is the capital of France."]
    true = ["Tom has 3 apples and gets 4 more. How many apples does he have?", "What is the capital of France?"]
    found = true_instruction_loglik(model, tiny_tokenizer, responses, true, system="tag")
    pairs = [Pair(x, y) for x, y in zip(true, responses, strict=True)]
    direct = score_pairs(model, tiny_tokenizer, "reverse", pairs, None, "tag")
    assert found == [s.mean for s in direct] and len(found) == 2 and all(math.isfinite(v) and v < 0 for v in found)
    swapped = score_pairs(
        model, tiny_tokenizer, "reverse", [Pair(p.response, p.instruction) for p in pairs], None, "tag"
    )
    assert found != [s.mean for s in swapped]  # the instruction is the target, the response the condition
