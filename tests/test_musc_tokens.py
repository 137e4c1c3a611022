"""MuSC token weights: agree with a naive full-logit computation, vanish when x′ = x, never weight the prompt."""

from __future__ import annotations

import pytest
import torch

from mainlib.models import load_model
from mainlib.musc.tokens import (
    TokenWeights,
    TokenWeightSettings,
    normalise,
    sequence_weights,
    token_weights,
    weigh_pairs,
)
from mainlib.prompts import encode
from mainlib.scoring import ScoringSettings

CLEAN = ["Write a poem about the sea. Use exactly four lines.", "Name a fruit. Answer in one word."]
CORRUPT = ["Write a poem about the sea.", "Name a fruit. Answer in three sentences."]
RESPONSES = ["Waves roll in,\nthe gulls cry,\nsalt on the wind,\nthe tide goes by.", "Apple."]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), "none")


def naive_logps(model, tokenizer, instruction: str, response: str) -> tuple[torch.Tensor, list[int]]:
    """Full logits of the whole sequence; log-softmax rows that predict the response tokens."""
    enc = encode(tokenizer, "forward", instruction, response)
    logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0].double()
    return torch.log_softmax(logits[enc.prompt_len - 1 : -1], -1), enc.target_ids


@pytest.mark.parametrize("mode", ["kl", "reverse_kl", "bikl", "pmi"])
def test_measure_matches_naive_and_lines_up(model, tiny_tokenizer, mode: str) -> None:
    settings = TokenWeightSettings(mode=mode, scoring=ScoringSettings(token_budget=64, head_chunk=5))
    result = token_weights(model, tiny_tokenizer, CLEAN, CORRUPT, RESPONSES, settings)
    for weights, x, x_prime, y in zip(result, CLEAN, CORRUPT, RESPONSES, strict=True):
        with torch.no_grad():
            logp, ids = naive_logps(model, tiny_tokenizer, x, y)
            logq, _ = naive_logps(model, tiny_tokenizer, "" if mode == "pmi" else x_prime, y)
        assert list(weights.token_ids) == ids and tiny_tokenizer.decode(ids) == y + "<|im_end|>"
        if mode == "pmi":
            expected = (logp - logq)[torch.arange(len(ids)), ids]
        else:
            kl = (logq.exp() * (logq - logp)).sum(-1)
            reverse = (logp.exp() * (logp - logq)).sum(-1)
            expected = {"kl": kl, "reverse_kl": reverse, "bikl": (kl + reverse) / 2}[mode]
        torch.testing.assert_close(torch.tensor(weights.measure, dtype=torch.float64), expected, atol=1e-4, rtol=1e-4)
        assert all(0.0 <= w <= 2.0 for w in weights.weights)
        if mode != "pmi":
            assert min(weights.measure) >= 0.0


def test_no_weight_when_the_contrast_is_the_instruction(model, tiny_tokenizer) -> None:
    for mode in ("kl", "reverse_kl", "bikl"):
        result = token_weights(model, tiny_tokenizer, CLEAN, CLEAN, RESPONSES, TokenWeightSettings(mode=mode))
        for weights in result:
            assert max(weights.measure) < 1e-5 and set(weights.weights) == {0.0}


def test_prompt_tokens_get_weight_zero(model, tiny_tokenizer) -> None:
    result = token_weights(model, tiny_tokenizer, CLEAN[:1], CORRUPT[:1], RESPONSES[:1])[0]
    enc = encode(tiny_tokenizer, "forward", CLEAN[0], RESPONSES[0])
    full = sequence_weights(enc, result)
    assert len(full) == len(enc.input_ids) and full[: enc.prompt_len] == [0.0] * enc.prompt_len
    assert full[enc.prompt_len :] == list(result.weights) and sum(result.weights) > 0
    with pytest.raises(ValueError, match="another tokenisation"):
        sequence_weights(encode(tiny_tokenizer, "forward", CLEAN[0], RESPONSES[1]), result)


def test_normalise_by_hand() -> None:
    weights = normalise(torch.tensor([0.0, 1.0, 2.0, 9.0]), w_max=2.0)  # mean 3
    assert weights.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3, 2.0])
    assert normalise(torch.tensor([-1.0, 0.5]), 2.0).tolist() == [0.0, 0.0]  # mean <= 0: no signal


def test_mode_none_is_all_ones(model, tiny_tokenizer) -> None:
    result = token_weights(model, tiny_tokenizer, CLEAN, CORRUPT, RESPONSES, TokenWeightSettings(mode="none"))
    assert all(set(w.weights) == {1.0} for w in result)
    with pytest.raises(ValueError, match="mode must be one of"):
        token_weights(model, tiny_tokenizer, CLEAN, CORRUPT, RESPONSES, TokenWeightSettings(mode="entropy"))


def test_all_zero_weights_become_uniform_or_drop_the_pair() -> None:
    def weights(*values: float) -> TokenWeights:
        return TokenWeights(tuple(range(len(values))), values, tuple(v - 1 for v in values))  # measure: any

    rows = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    chosen = [weights(0.5, 1.5), weights(0.0, 0.0, 0.0), weights(0.0, 0.0)]
    rejected = [weights(1.0, 1.0), weights(2.0, 0.0), weights(0.0)]
    kept, counts = weigh_pairs(rows, chosen, rejected, "uniform")
    assert counts == {"pairs": 3, "zero_weight_sequences": 3, "dropped_zero_weights": 0, "kept": 3}
    assert kept[0]["chosen_weights"]["weights"] == (0.5, 1.5)  # a weighted response is left as it is
    assert kept[1]["chosen_weights"]["weights"] == (1.0, 1.0, 1.0)  # plain DPO for the unweighted one
    assert kept[1]["rejected_weights"]["weights"] == (2.0, 0.0) and kept[2]["rejected_weights"]["weights"] == (1.0,)
    assert kept[1]["chosen_weights"]["measure"] == (-1.0, -1.0, -1.0)  # the raw measure stays, to show why
    kept, counts = weigh_pairs(rows, chosen, rejected, "drop")
    assert counts == {"pairs": 3, "zero_weight_sequences": 3, "dropped_zero_weights": 2, "kept": 1}
    assert [r["id"] for r in kept] == ["a"]
    with pytest.raises(ValueError, match="zero_weights must be one of"):
        weigh_pairs(rows, chosen, rejected, "keep")
