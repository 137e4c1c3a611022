"""The α weighting is exact, the TRL override computes it, and 4-bit + LoRA training lowers the loss on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mainlib.data import Pair
from mainlib.models import LoraSettings, add_lora, load_model
from mainlib.sft import (
    SEED,
    SYNTHETIC,
    SFTSettings,
    WeightedCollator,
    build_dataset,
    example_weights,
    make_trainer,
    packed_per_example_nll,
    train_adapter,
    weight_pairs,
    weighted_loss,
)

SEED_PAIRS = [
    Pair("Name a fruit.", "An apple."),
    Pair("What is 2 + 2?", "2 + 2 is 4."),
    Pair("Translate 'merci' to English.", "It means thank you."),
]
SYNTHETIC_PAIRS = [
    Pair("Give a colour.", "Blue is a colour."),
    Pair("Write a short greeting for a letter to a friend.", "Dear friend, I hope you are well and happy."),
    Pair("Say yes.", "Yes."),
    Pair("Count to three.", "One, two, three."),
    Pair("Describe the sea in a few words.", "Vast, blue and restless."),
]


@pytest.mark.parametrize(("n_seed", "n_syn", "alpha"), [(3, 5, 0.1), (3, 5, 0.5), (10, 1, 0.9), (1, 10, 0.0)])
def test_weights_reproduce_the_mixture_exactly(n_seed: int, n_syn: int, alpha: float) -> None:
    generator = torch.Generator().manual_seed(n_seed * 100 + n_syn)
    seed_losses = torch.rand(n_seed, generator=generator, dtype=torch.float64) * 5
    syn_losses = torch.rand(n_syn, generator=generator, dtype=torch.float64) * 5
    w_seed, w_syn = example_weights(n_seed, n_syn, alpha)
    weights = torch.tensor([w_seed] * n_seed + [w_syn] * n_syn, dtype=torch.float64)
    got = weighted_loss(torch.cat([seed_losses, syn_losses]), weights)
    expected = alpha * syn_losses.mean() + (1 - alpha) * seed_losses.mean()
    assert abs(got.item() - expected.item()) < 1e-12


def test_weight_edge_cases() -> None:
    assert example_weights(4, 0, 0.7) == (1.0, 0.0)
    assert example_weights(0, 4, 0.7) == (0.0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        example_weights(1, 1, 1.5)


def reference_nll(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-example mean target NLL from full logits, the plain way."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    targets = labels[:, 1:]
    mask = targets != -100
    token_logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(token_logp * mask).sum(-1) / mask.sum(-1)


@pytest.mark.parametrize(("direction", "packing"), [("forward", False), ("reverse", False), ("forward", True)])
def test_trainer_loss_equals_alpha_mixture_on_a_fixed_batch(
    tiny_model_dir, tiny_tokenizer, tmp_path, direction, packing
):
    alpha = 0.3
    settings = SFTSettings(direction=direction, batch_size=8, max_length=128, packing=packing)
    dataset, counts = build_dataset(weight_pairs(SEED_PAIRS, SYNTHETIC_PAIRS, alpha), tiny_tokenizer, settings)
    assert counts["examples"] == 8
    model = add_lora(load_model(str(tiny_model_dir), "none"), LoraSettings(r=4, alpha=8, dropout=0.0))
    trainer = make_trainer(model, tiny_tokenizer, dataset, settings, tmp_path)
    examples = [dataset[i] for i in range(len(dataset))]
    batch = trainer.data_collator(examples)
    assert ("position_ids" in batch and "attention_mask" not in batch) == packing
    padded = WeightedCollator(pad_token_id=tiny_tokenizer.pad_token_id)(examples)  # the reference: one row each
    groups = batch["group"].clone()
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        nll = reference_nll(model, padded["input_ids"], padded["labels"], padded["attention_mask"])
    expected = alpha * nll[groups == SYNTHETIC].mean() + (1 - alpha) * nll[groups == SEED].mean()
    assert abs(loss.item() - expected.item()) < 1e-5
    assert trainer._metrics["train"]["seed_loss"][-1] == pytest.approx(nll[groups == SEED].mean().item(), abs=1e-5)


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    """In a packed row each example's NLL and gradient are those of the example alone.

    Rewriting the first example's tokens must not move the second one's NLL; and the packed row's
    weighted loss has the padded batch's gradient.
    """
    settings = SFTSettings(batch_size=4, max_length=128, packing=True)
    dataset, _ = build_dataset(SEED_PAIRS[:2] + SYNTHETIC_PAIRS[:2], tiny_tokenizer, settings)
    model = add_lora(load_model(str(tiny_model_dir), "none"), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a non-zero B, so the adapter takes part in the gradients compared below
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    trainer = make_trainer(model, tiny_tokenizer, dataset, settings, tmp_path)
    model.train()
    examples = [dataset[i] for i in range(len(dataset))]

    def packed_nll(rows):
        batch = trainer.data_collator(rows)
        out = model(**{k: v for k, v in batch.items() if k not in ("weight", "group")}, fused_lm_head=True)
        return packed_per_example_nll(out.log_probs, out.label_mask, batch["position_ids"])

    with torch.no_grad():
        before = packed_nll(examples)
        changed = dict(examples[0], input_ids=[(t * 7 + 3) % len(tiny_tokenizer) for t in examples[0]["input_ids"]])
        after = packed_nll([changed, *examples[1:]])
        alone = packed_nll(examples[1:2])
    assert abs(after[0] - before[0]) > 1e-3  # the rewrite changed the first example ...
    assert torch.allclose(after[1:], before[1:], atol=1e-6)  # ... and nothing else
    assert abs(alone[0] - before[1]) < 1e-5

    def grads(collator):
        model.zero_grad()
        trainer.compute_loss(model, dict(collator(examples))).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    packed_grad = grads(trainer.data_collator)
    padded_grad = grads(WeightedCollator(pad_token_id=tiny_tokenizer.pad_token_id))
    assert torch.allclose(packed_grad, padded_grad, rtol=1e-4, atol=1e-7), (packed_grad - padded_grad).abs().max()


def test_4bit_lora_training_lowers_the_loss(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    settings = SFTSettings(epochs=8, batch_size=4, learning_rate=2e-2, warmup=0, scheduler="constant", max_length=64)
    _, result = train_adapter(
        str(tiny_model_dir),
        tiny_tokenizer,
        SEED_PAIRS[:2] + SYNTHETIC_PAIRS[:2],
        settings,
        LoraSettings(r=8, alpha=16, dropout=0.0),
        tmp_path / "adapter",
        quantization="4bit",
    )
    losses = result.loss_values
    assert len(losses) == 8 and result.counts["optimizer_steps"] == 8
    assert losses[-1] < 0.25 * losses[0], losses  # seen: 9.2 -> 0.1
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "sft_result.json").is_file()


def test_gradient_accumulation_keeps_the_example_mean(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    """One step over 4 examples logs the same weighted mean as 1 x 4 or as 2 micro-batches x 2.

    LoRA's B starts at zero, so before the first update every run sees the base model: the first logged
    loss depends only on which examples the step averages, and on how the micro-batches are combined.
    """
    from mainlib.sft import train_sft

    data = weight_pairs(SEED_PAIRS[:2], SYNTHETIC_PAIRS[:2], alpha=0.8)
    first_losses = []
    for batch_size, grad_accum in ((4, 1), (2, 2), (1, 4)):
        model = add_lora(load_model(str(tiny_model_dir), "none"), LoraSettings(r=4, alpha=8, dropout=0.0))
        settings = SFTSettings(epochs=1, batch_size=batch_size, grad_accum=grad_accum, max_length=64)
        result = train_sft(model, tiny_tokenizer, data, settings, tmp_path / f"{batch_size}x{grad_accum}")
        assert result.counts["optimizer_steps"] == 1
        first_losses.append(result.loss_values[0])
    assert max(first_losses) - min(first_losses) < 1e-5, first_losses


def test_packing_is_chosen_by_the_attention_kernel(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    """Default (packing=None): padded, length-grouped batches under SDPA; packed rows under a varlen kernel."""
    from types import SimpleNamespace

    from mainlib.sft import packing_pays

    model = add_lora(load_model(str(tiny_model_dir), "none"), LoraSettings(r=4, alpha=8, dropout=0.0))
    assert not packing_pays(model)
    dataset, _ = build_dataset(SEED_PAIRS, tiny_tokenizer, SFTSettings())
    assert not make_trainer(model, tiny_tokenizer, dataset, SFTSettings(), tmp_path).data_collator.padding_free
    for kernel, pays in (("flash_attention_2", True), ("flex_attention", True), ("sdpa", False), ("eager", False)):
        assert packing_pays(SimpleNamespace(config=SimpleNamespace(_attn_implementation=kernel))) == pays


@pytest.mark.slow  # compiles the FlexAttention kernel (inductor)
def test_packed_rows_under_flex_attention_score_like_padded_rows(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    """FlexAttention is a varlen kernel (mainlib packs under it on CUDA); forward only here: no CPU backward."""
    model = load_model(str(tiny_model_dir), "none", attn_implementation="flex_attention")
    model = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    settings = SFTSettings(batch_size=4, max_length=128)
    dataset, _ = build_dataset(SEED_PAIRS[:2] + SYNTHETIC_PAIRS[:2], tiny_tokenizer, settings)
    trainer = make_trainer(model, tiny_tokenizer, dataset, settings, tmp_path)
    assert trainer.data_collator.padding_free  # chosen by the kernel
    rows = [dataset[i] for i in range(len(dataset))]
    model.eval()
    with torch.no_grad():
        packed = trainer.compute_loss(model, dict(trainer.data_collator(rows)))
        padded = trainer.compute_loss(model, dict(WeightedCollator(pad_token_id=tiny_tokenizer.pad_token_id)(rows)))
    assert abs(packed.item() - padded.item()) < 1e-5


def test_fast_dropout_drops_at_rate_p_and_keeps_the_expectation() -> None:
    """`FastDropout` is dropout: each element kept with probability 1 - p (p rounded to 2^-16), kept ones scaled by
    1 / (1 - p); the same seed gives the same mask; eval mode is the identity; LoRA dropouts are the ones swapped."""
    from mainlib.models import LoraSettings, add_lora
    from mainlib.training import FastDropout, use_fast_dropout

    dropout = FastDropout(0.05).train()
    x = torch.ones(64, 128, 96, dtype=torch.bfloat16)
    torch.manual_seed(0)
    out = dropout(x)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.95) < 0.003, kept  # 786k draws: the standard error is 2.5e-4
    assert abs(out.float().mean().item() - 1.0) < 0.005 and out.dtype == x.dtype
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out)
    assert torch.equal(dropout.eval()(x), x)

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = add_lora(LlamaForCausalLM(config), LoraSettings(r=2, dropout=0.1))
    use_fast_dropout(model)
    swapped = [m for m in model.modules() if isinstance(m, FastDropout)]
    assert len(swapped) == 7 and all(m.p == 0.1 for m in swapped)  # q, k, v, o, gate, up, down
