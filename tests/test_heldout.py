"""Held-out preference accuracy: margins on hand-made log-probs, the split, and the model path against TRL's loss
and against `scoring` called directly."""

from __future__ import annotations

import math

import pytest
import torch

from mainlib.adapters import ModelBank
from mainlib.data import Pair
from mainlib.models import LoraSettings, load_model
from mainlib.musc.heldout import (
    SequenceLogps,
    heldout_accuracy,
    preference_accuracy,
    reward_margins,
    sequence_logps,
    split_heldout,
)
from mainlib.musc.tdpo import DPOSettings, make_trainer, preference_dataset
from mainlib.prompts import encode
from mainlib.scoring import score_pairs
from tests.test_adapters import perturb
from tests.test_musc_tdpo import ROWS, collated, lora, loss_of, perturb_adapter


def test_split_is_seeded_disjoint_and_in_order() -> None:
    rows = [{"id": i} for i in range(10)]
    train, held = split_heldout(rows, 0.2, seed=0)
    assert len(held) == 2 and len(train) == 8 and sorted(train + held, key=lambda r: r["id"]) == rows
    assert train == sorted(train, key=lambda r: r["id"]) and held == sorted(held, key=lambda r: r["id"])
    assert split_heldout(rows, 0.2, seed=0) == (train, held) and split_heldout(rows, 0.2, seed=1)[1] != held
    assert len(split_heldout(list(range(7)), 0.3, seed=0)[1]) == 2  # round(2.1)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        split_heldout(rows, 1.0)


def test_margins_and_accuracy_on_hand_made_log_probs() -> None:
    policy = SequenceLogps(chosen=[-10.0, -5.0, -3.0], rejected=[-15.0, -6.0, -3.0])
    reference = SequenceLogps(chosen=[-12.0, -4.0, -3.0], rejected=[-14.0, -7.0, -3.0])
    # pair 0: 0.1·((−10+12) − (−15+14)) = 0.3; pair 1: 0.1·((−5+4) − (−6+7)) = −0.2; pair 2: no change, 0
    margins = reward_margins(policy, reference, beta=0.1)
    assert margins == pytest.approx([0.3, -0.2, 0.0])
    assert reward_margins(policy, reference, beta=1.0) == pytest.approx([3.0, -2.0, 0.0])
    assert preference_accuracy(margins) == pytest.approx(1 / 3)  # a zero margin is no preference
    with pytest.raises(ValueError, match="at least one pair"):
        preference_accuracy([])


def weighted_rows(tokenizer) -> list[dict]:
    """ROWS with uneven token weights (0.5, 1.5, 0.5, ...), as the token_weights stage stores them."""
    rows = []
    for row in ROWS:
        row = dict(row)
        for side in ("chosen", "rejected"):
            ids = encode(tokenizer, "forward", row["prompt"], row[side]).target_ids
            row[f"{side}_weights"] = {"token_ids": ids, "weights": [0.5 + (t % 2) for t in range(len(ids))]}
        rows.append(row)
    return rows


def test_margins_are_the_ones_tdpo_trains(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    """TRL's token-weighted sigmoid loss on these pairs is the mean of −log σ(margin) with our margins."""
    rows = weighted_rows(tiny_tokenizer)
    dataset, _ = preference_dataset(rows, tiny_tokenizer, 512)
    settings = DPOSettings(beta=0.5, batch_size=3)
    torch.manual_seed(0)
    trainer = make_trainer(
        load_model(str(tiny_model_dir), "none"), tiny_tokenizer, dataset, settings, tmp_path, peft_config=lora()
    )
    perturb_adapter(trainer.model)
    policy = sequence_logps(trainer.model, dataset)
    with trainer.model.disable_adapter():
        reference = sequence_logps(trainer.model, dataset)
    margins = reward_margins(policy, reference, settings.beta)
    expected = sum(math.log1p(math.exp(-m)) for m in margins) / len(margins)
    assert loss_of(trainer, collated(tiny_tokenizer, rows)) == pytest.approx(expected, abs=1e-4)
    assert min(abs(m) for m in margins) > 1e-3  # the check means something: the policy is not the reference
    plain = sequence_logps(trainer.model, dataset, weighted=False)  # every w_t = 1: other sums
    assert all(abs(a - b) > 1e-4 for a, b in zip(plain.chosen, policy.chosen, strict=True))


def test_bank_accuracy_is_scoring_called_directly(tiny_model_dir, tiny_tokenizer) -> None:
    bank = ModelBank(str(tiny_model_dir), "none")
    bank.add("policy", LoraSettings(r=4, alpha=8, dropout=0.0), seed=0)
    perturb(bank, "policy", 0)
    result = heldout_accuracy(bank, "policy", tiny_tokenizer, ROWS, DPOSettings(beta=0.1))

    def sums(name: str | None, side: str) -> list[float]:
        with bank.use(name) as model:
            found = score_pairs(model, tiny_tokenizer, "forward", [Pair(r["prompt"], r[side]) for r in ROWS])
        return [sum(s.logprobs) for s in found]

    chosen = [p - r for p, r in zip(sums("policy", "chosen"), sums(None, "chosen"), strict=True)]
    rejected = [p - r for p, r in zip(sums("policy", "rejected"), sums(None, "rejected"), strict=True)]
    expected = [0.1 * (c - r) for c, r in zip(chosen, rejected, strict=True)]
    assert result.margins == pytest.approx(expected, abs=1e-5) and all(math.isfinite(m) for m in result.margins)
    assert result.accuracy == sum(m > 0 for m in expected) / 3 and result.counts["kept"] == 3
    assert result.to_dict()["margins"] == result.margins
