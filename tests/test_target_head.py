"""The CPU target head against full-vocabulary log-softmax: same values, same gradients, same statistics."""

from __future__ import annotations

import pytest
import torch

from mainlib.models import LoraSettings, add_lora, load_model
from mainlib.target_head import ROWS_PER_CHUNK, TargetLogSoftmax, token_statistics, use_target_head


def test_log_softmax_values_gradient_and_statistics_match_autograd():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2 * ROWS_PER_CHUNK + 7, 50, generator=generator) * 4).requires_grad_()
    targets = torch.randint(0, 50, (len(logits),), generator=generator)
    weights = torch.randn(len(logits), generator=generator)  # a non-uniform incoming gradient

    ours, lse = TargetLogSoftmax.apply(logits, targets)
    (ours * weights).sum().backward()
    ours_grad, logits.grad = logits.grad, None
    log_p = logits.log_softmax(-1)
    reference = log_p.gather(1, targets[:, None]).squeeze(1)
    (reference * weights).sum().backward()

    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours_grad, logits.grad, atol=1e-6)
    stats = token_statistics(logits.detach(), targets, lse)
    p = log_p.detach().exp()
    assert torch.allclose(stats["entropy"], -(p * log_p.detach()).sum(-1), atol=1e-4)
    assert torch.allclose(stats["log_sum_sq_probs"], (p**2).sum(-1).log(), atol=1e-4)
    assert torch.allclose(stats["mean_logits"], logits.detach().mean(-1), atol=1e-5)
    assert torch.equal(stats["is_top1"], logits.detach().argmax(-1) == targets)


def full_vocabulary(model, batch):
    """log p(token t+1) over the full logits in fp32: the reference the target head must equal."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return logits.log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(-1) * mask, mask


@pytest.mark.parametrize("quantization", ["none", "bf16"])
def test_target_head_matches_full_logits_on_a_model(tiny_model_dir, quantization):
    """Same per-token log p (fp32: to rounding; bf16: the bf16 logits' rounding), same LoRA gradient."""
    model = add_lora(load_model(str(tiny_model_dir), quantization), LoraSettings(r=4, alpha=8, dropout=0.0))
    use_target_head(model)
    with torch.no_grad():  # a non-zero B, so the gradient reaches both LoRA matrices
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[2, 9:] = 0  # a padded row
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :4] = -100  # a prompt
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}

    def lora_grad(log_probs):
        model.zero_grad()
        log_probs.sum().backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])

    ours = model(**batch, fused_lm_head=True)
    reference, mask = full_vocabulary(model, batch)
    assert torch.equal(ours.label_mask, mask)
    tolerance = 1e-5 if quantization == "none" else 2e-2  # bf16: logits carry 8 bits of mantissa
    assert torch.allclose(ours.log_probs, reference, atol=tolerance)
    assert torch.allclose(ours.loss, -reference.sum() / mask.sum(), atol=tolerance)
    assert torch.allclose(lora_grad(ours.log_probs), lora_grad(reference), atol=tolerance, rtol=tolerance)
    assert not ours.is_top1[~mask].any() and not ours.entropy[~mask].any()
