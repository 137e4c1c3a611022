"""Token-weighted DPO: w ≡ 1 is stock TRL DPO, w ≡ 0 is log 2, doubling a sequence's weights doubles its reward."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import DPOTrainer

from mainlib.models import load_model
from mainlib.musc.tdpo import (
    DPOSettings,
    TokenWeightedCollator,
    dpo_config,
    make_trainer,
    preference_dataset,
    train_tdpo,
)
from mainlib.prompts import encode

ROWS = [
    {"prompt": "Name a fruit. Answer in one word.", "chosen": "Apple.", "rejected": "Apples are red or green fruits."},
    {"prompt": "Write a haiku about rain.", "chosen": "Soft rain on the roof\nthe garden drinks", "rejected": "Rain."},
    {"prompt": "Say hello in French, in lower case.", "chosen": "bonjour", "rejected": "BONJOUR!"},
]


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def perturb_adapter(model) -> None:
    """Give the fresh adapter the same non-zero values in every trainer, so the policy differs from the reference."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def collated(tokenizer, rows, weights=None) -> dict:
    """One batch of `rows` through our collator; `weights(side, n_tokens)` overrides the stored weights."""
    if weights is not None:
        rows = [dict(r) for r in rows]
        for r in rows:
            for side in ("chosen", "rejected"):
                ids = encode(tokenizer, "forward", r["prompt"], r[side]).target_ids
                r[f"{side}_weights"] = {"token_ids": ids, "weights": weights(side, len(ids))}
    dataset, _ = preference_dataset(rows, tokenizer, max_length=512)
    return TokenWeightedCollator(pad_token_id=tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


@pytest.fixture()
def weighted(tiny_model_dir, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    dataset, _ = preference_dataset(ROWS, tiny_tokenizer, 512)
    trainer = make_trainer(
        load_model(str(tiny_model_dir), "none"),
        tiny_tokenizer,
        dataset,
        DPOSettings(batch_size=3),
        tmp_path / "weighted",
        peft_config=lora(),
    )
    perturb_adapter(trainer.model)
    return trainer


def loss_of(trainer, batch) -> float:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, dict(batch)).item()


def test_unit_weights_equal_stock_trl_dpo(weighted, tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    torch.manual_seed(0)
    stock = DPOTrainer(
        model=load_model(str(tiny_model_dir), "none"),
        args=dpo_config(DPOSettings(batch_size=3), tmp_path / "stock"),
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tiny_tokenizer,
        peft_config=lora(),
    )
    perturb_adapter(stock.model)
    batch = collated(tiny_tokenizer, ROWS)
    assert torch.equal(
        batch["token_weights"][batch["completion_mask"] == 1], torch.ones(int(batch["completion_mask"].sum()))
    )
    stock_batch = {k: v for k, v in batch.items() if k != "token_weights"}
    ours, theirs = loss_of(weighted, batch), loss_of(stock, stock_batch)
    assert abs(ours - theirs) < 1e-5
    assert abs(ours - math.log(2)) > 1e-3  # the adapter really moved the policy away from the reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(weighted._metrics["train"][key][-1] - stock._metrics["train"][key][-1]) < 1e-5


def test_zero_weights_give_log_two(weighted, tiny_tokenizer) -> None:
    batch = collated(tiny_tokenizer, ROWS, weights=lambda side, n: [0.0] * n)
    assert abs(loss_of(weighted, batch) - math.log(2)) < 1e-6


def test_doubling_one_sequence_doubles_its_reward(weighted, tiny_tokenizer) -> None:
    base = torch.Generator().manual_seed(1)
    chosen_w = (2 * torch.rand(64, generator=base)).tolist()
    rejected_w = (2 * torch.rand(64, generator=base)).tolist()

    def rewards(scale: float) -> tuple[float, float]:
        batch = collated(
            tiny_tokenizer,
            ROWS[:1],
            weights=lambda side, n: [scale * w for w in chosen_w[:n]] if side == "chosen" else rejected_w[:n],
        )
        loss_of(weighted, batch)
        metrics = weighted._metrics["train"]
        return metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]

    (chosen_1, rejected_1), (chosen_2, rejected_2) = rewards(1.0), rewards(2.0)
    assert abs(chosen_1) > 1e-4
    assert chosen_2 == pytest.approx(2 * chosen_1, rel=1e-5)
    assert rejected_2 == pytest.approx(rejected_1, rel=1e-6)


def test_weights_must_match_the_tokenisation(tiny_tokenizer) -> None:
    row = dict(ROWS[0], chosen_weights={"token_ids": [1, 2, 3], "weights": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="pair 0: the chosen weights were computed on another tokenisation"):
        preference_dataset([row], tiny_tokenizer, 512)


def test_prompt_gets_zero_and_long_responses_are_cut(tiny_tokenizer) -> None:
    prompt_len = encode(tiny_tokenizer, "forward", ROWS[1]["prompt"], "").prompt_len
    dataset, counts = preference_dataset(ROWS[1:2], tiny_tokenizer, max_length=prompt_len + 3)
    assert counts == {
        "pairs": 1,
        "prompt_too_long": 0,
        "responses_cut": 2,
        "kept": 1,
    }  # both responses are longer than 3 tokens
    assert len(dataset[0]["chosen_ids"]) == 3 and len(dataset[0]["chosen_weights"]) == 3
    batch = TokenWeightedCollator(pad_token_id=tiny_tokenizer.pad_token_id)([dataset[0]])
    assert batch["token_weights"][:, :prompt_len].abs().sum() == 0
    assert torch.equal(batch["token_weights"] > 0, batch["completion_mask"] == 1)


def test_training_raises_the_reward_margin(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    settings = DPOSettings(beta=0.1, learning_rate=5e-3, epochs=6, batch_size=3, warmup=0.0, scheduler="constant")
    _, result = train_tdpo(
        load_model(str(tiny_model_dir), "none"), tiny_tokenizer, ROWS, settings, tmp_path / "t", peft_config=lora()
    )
    assert result.counts["optimizer_steps"] == 6
    assert result.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # fresh adapter: policy = reference
    assert result.log[-1]["rewards/margins"] > 0.1 and result.log[-1]["loss"] < result.log[0]["loss"]


def test_qlora_path_trains(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    """The 4-bit policy as MuSC loads it on CUDA (bitsandbytes also runs on CPU): the adapter learns."""
    from mainlib.models import LoraSettings, is_quantized, lora_config, prepare_for_lora

    model = load_model(str(tiny_model_dir), "4bit")
    assert is_quantized(model)
    settings = DPOSettings(learning_rate=5e-3, epochs=4, batch_size=3, warmup=0.0, scheduler="constant")
    peft_config = lora_config(LoraSettings(r=4, alpha=8, dropout=0.0))
    _, result = train_tdpo(prepare_for_lora(model), tiny_tokenizer, ROWS, settings, tmp_path / "q", peft_config)
    assert result.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert result.log[-1]["rewards/margins"] > 0.05
