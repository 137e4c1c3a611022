"""Per-token log p of the target tokens only, for training on a CPU (`use_target_head`, in both our trainers).

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

import functools
from collections.abc import Callable
from typing import Any

import torch
from trl.trainer.utils import FusedCausalLMOutput

ROWS_PER_CHUNK = 256  # fp32 rows of the vocabulary at a time: 256 x 49,152 x 4 bytes = 48 MiB


class TargetLogSoftmax(torch.autograd.Function):
    """log softmax(logits)[target] per row, in fp32 row chunks, and each row's log-sum-exp (no gradient). Saves the
    logits as given (bf16: half an fp32 copy) and the log-sum-exps; backward: d/dz_j log p_y = [j = y] - softmax(z)_j,
    times the incoming grad."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        for start in range(0, len(logits), ROWS_PER_CHUNK):
            lse[start : start + ROWS_PER_CHUNK] = logits[start : start + ROWS_PER_CHUNK].float().logsumexp(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.mark_non_differentiable(lse)
        return logits.gather(1, targets[:, None]).squeeze(1).float() - lse, lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, len(logits), ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            g = grad[rows, None].float()
            chunk = (logits[rows].float() - lse[rows, None]).exp_().mul_(-g)  # -g * softmax
            grad_logits[rows] = chunk.scatter_add_(1, targets[rows, None], g)  # + g at the target
        return grad_logits, None


@torch.no_grad()
def token_statistics(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor) -> dict[str, torch.Tensor]:
    """What TRL's fused head also reports per target, for the trainers' metrics (no gradient): entropy, log Σ p²,
    the mean logit, and whether the target is the most likely token."""
    fields = {name: lse.new_empty(lse.shape) for name in ("entropy", "log_sum_sq_probs", "mean_logits")}
    fields["is_top1"] = torch.empty(lse.shape, dtype=torch.bool, device=lse.device)
    for start in range(0, len(logits), ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        z, norm = logits[rows].float(), lse[rows, None]
        fields["entropy"][rows] = lse[rows] - ((z - norm).exp() * z).sum(-1)  # -Σ p log p = lse - Σ p z
        fields["log_sum_sq_probs"][rows] = (2 * z).logsumexp(-1) - 2 * lse[rows]
        fields["mean_logits"][rows] = z.mean(-1)
        fields["is_top1"][rows] = z.argmax(-1) == targets[rows]
    return fields


def target_outputs(forward: Callable[..., Any], labels: torch.Tensor, args: tuple, kwargs: dict) -> FusedCausalLMOutput:
    """TRL's `FusedCausalLMOutput` for `labels` (-100: no target), from `forward` (the model's own, unfused) run
    with transformers' boolean `logits_to_keep`: only positions whose next token is a target are projected."""
    items = kwargs.pop("num_items_in_batch", None)  # what the summed loss is divided by (default: the targets)
    mask = labels[:, 1:] != -100
    keep = torch.nn.functional.pad(mask, (0, 1))  # position t is kept when token t+1 is a target
    logits = forward(*args, **{**kwargs, "use_cache": False, "logits_to_keep": keep}).logits  # (targets, vocab)
    targets = labels[:, 1:][mask]
    per_target, lse = TargetLogSoftmax.apply(logits, targets)

    def spread(values: torch.Tensor) -> torch.Tensor:  # (targets,) -> (B, T - 1), 0 off target
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    log_probs = spread(per_target)
    stats = {name: spread(values) for name, values in token_statistics(logits, targets, lse).items()}
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if items is None else items)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, **stats)


def use_target_head(model: torch.nn.Module) -> None:
    """Serve `model(..., labels=labels, fused_lm_head=True)` on CPU with `target_outputs`, for our SFT and DPO
    trainers. Call it after the trainer is built: TRL's SFTTrainer and DPOTrainer patch the model's forward with
    their fused head in `__init__`, and this wraps that patch. What it does not cover goes to TRL's head: other
    devices, pre-shifted labels (sequence parallelism), MoE router losses. Temperature is 1 (TRL's default, and
    the only one SFT and DPO use)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused = inner.forward
    config = inner.config.get_text_config()

    @functools.wraps(fused)
    def forward(*args: Any, fused_lm_head: bool = False, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        ours = fused_lm_head and labels is not None and labels.device.type == "cpu"
        if not ours or "shift_labels" in kwargs or getattr(config, "output_router_logits", False):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)
        return target_outputs(fused, labels, args, kwargs)

    inner.forward = forward
