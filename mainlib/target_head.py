"""Per-token log p of the target tokens only, for training on a CPU.

TRL's fused LM head (`model(..., fused_lm_head=True)`) projects only the positions that have a label on Triton
devices; elsewhere it projects every position, in fp32 tiles (the bf16 weight is upcast for each tile). For the
SmolLM2-135M shape the head is 28M of the model's 135M parameters (vocab 49,152 x 576), so on a CPU that step was
about 15% of a LoRA SFT step (`python -m bench sft --trace`). Here the model's own forward projects only the
positions whose next token is a target (transformers' boolean `logits_to_keep`), in the model's dtype (bf16 on a
CPU with bf16 matmuls), and the log-softmax runs in fp32 row chunks without an fp32 copy of the logits.

Memory: the (targets x vocab) logits stay alive for the backward, 2 bytes each in bf16: 1,024 targets x 49,152 =
96 MiB, against TRL's fp32 tiles of 4,096 x 4,096. On a GPU, TRL's Triton kernel never holds them, so GPUs keep it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

ROWS_PER_CHUNK = 256  # fp32 rows of the vocabulary at a time: 256 x 49,152 x 4 bytes = 48 MiB


class TargetOutput(NamedTuple):
    """What a trainer reads per position t of a (B, T) batch, predicting token t+1: shape (B, T - 1) each."""

    log_probs: torch.Tensor  # log p(token t+1 | tokens <= t), 0 where token t+1 is not a target
    label_mask: torch.Tensor  # True where token t+1 is a target
    is_top1: torch.Tensor  # True where the target is the most likely token


class TargetLogSoftmax(torch.autograd.Function):
    """log softmax(logits)[target] per row, in fp32 row chunks. Saves the logits as given (bf16: half an fp32 copy)
    and one fp32 log-sum-exp per row; backward: d/dz_j log p_y = [j = y] - softmax(z)_j, times the incoming grad."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        for start in range(0, len(logits), ROWS_PER_CHUNK):
            lse[start : start + ROWS_PER_CHUNK] = logits[start : start + ROWS_PER_CHUNK].float().logsumexp(-1)
        ctx.save_for_backward(logits, targets, lse)
        return logits.gather(1, targets[:, None]).squeeze(1).float() - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, len(logits), ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            g = grad[rows, None].float()
            chunk = (logits[rows].float() - lse[rows, None]).exp_().mul_(-g)  # -g * softmax
            grad_logits[rows] = chunk.scatter_add_(1, targets[rows, None], g)  # + g at the target
        return grad_logits, None


def target_log_probs(model: torch.nn.Module, inputs: dict[str, Any]) -> TargetOutput:
    """Run `model` on `inputs` (with `labels`, -100 where there is no target) and score the target tokens.

    On CPU, only the target positions are projected (this module's docstring); on other devices, TRL's fused head,
    which SFTTrainer and DPOTrainer attach to the model, does it.
    """
    inputs = {**inputs, "use_cache": False}
    labels = inputs.pop("labels")
    if labels.device.type != "cpu":
        out = model(**inputs, labels=labels, fused_lm_head=True)
        return TargetOutput(out.log_probs, out.label_mask, out.is_top1)
    mask = labels[:, 1:] != -100
    keep = torch.nn.functional.pad(mask, (0, 1))  # position t is kept when token t+1 is a target
    logits = model(**inputs, logits_to_keep=keep).logits  # (targets, vocab), in the model's dtype
    targets = labels[:, 1:][mask]
    per_target = TargetLogSoftmax.apply(logits, targets)
    log_probs = per_target.new_zeros(mask.shape).masked_scatter(mask, per_target)
    is_top1 = mask.new_zeros(mask.shape).masked_scatter(mask, logits.detach().argmax(-1) == targets)
    return TargetOutput(log_probs, mask, is_top1)
