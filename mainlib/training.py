"""What every mainlib trainer (weighted SFT, token-weighted DPO) sets and reads the same way."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import SchedulerType

from mainlib import distributed

SCHEDULERS = tuple(s.value for s in SchedulerType)  # the `scheduler` values both trainers accept


def run_arguments(
    output_dir: str | Path, seed: int, batch_size: int, weights: torch.dtype | None = None
) -> dict[str, Any]:
    """TRL config fields shared by all trainers: precision for the device, seeds, no checkpoints, no loggers, and
    each process's share of the global micro-batch `batch_size` (the same recipe trains alike on 1 or N processes:
    Trainer's DDP averages the processes' gradients, i.e. over the whole global batch).

    Precision: bf16 autocast on GPUs that have bf16, fp16 on older ones; on CPU, bf16 autocast when the base
    `weights` are bf16 (mainlib's default on a CPU with bf16 matmuls), so the fp32 LoRA matmuls run in bf16 too
    (their fp32 master weights are what the optimizer updates), else fp32."""
    per_process = distributed.per_process_batch(batch_size, "batch_size")
    cuda = torch.cuda.is_available()
    bf16 = (cuda and torch.cuda.is_bf16_supported()) or (not cuda and weights == torch.bfloat16)
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_process,
        per_device_eval_batch_size=per_process,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # on, Trainer logs a NaN step's loss as the mean of the others (0.0 at first)
        gradient_checkpointing_kwargs={"use_reentrant": False},  # when on: what QLoRA + DDP needs (peft's examples)
    )


class FastDropout(torch.nn.Dropout):
    """Dropout whose CPU mask takes 16 random bits per element, drawn 64 at a time (a token keeps its value iff its
    16 bits, read as a signed int16, are >= round(p * 2^16) - 2^15): 2.9x faster than `nn.Dropout`'s per-element
    Bernoulli draw on a 4 x 512 x 576 bf16 activation (2.8 vs 8.1 ms), which took 10-25% of a LoRA SFT step of the
    SmolLM2-135M shape (7 LoRA dropouts per layer). p is rounded to a multiple of 2^-16; GPUs keep `nn.Dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu" or x.numel() % 4:
            return super().forward(x)
        threshold = round(self.p * 2**16) - 2**15
        bits = torch.empty(x.numel() // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
        keep = bits.view(torch.int16).view(x.shape) >= threshold
        return x * keep * (1.0 / (1.0 - (threshold + 2**15) / 2**16))


def use_fast_dropout(model: torch.nn.Module) -> None:
    """Make every LoRA dropout (`nn.Dropout` in peft's `lora_dropout`) a `FastDropout`, in place: the same module
    objects, so whoever holds them (`ModelBank` restores the rates TRL's DPOTrainer zeroes) still does."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for dropout in dropouts.values():
                if type(dropout) is torch.nn.Dropout:
                    dropout.__class__ = FastDropout


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite: training stopped before anything was saved."""


def diverged(args: Any, step: int, max_steps: int, what: str, value: float) -> TrainingDiverged:
    """The error for a non-finite `what` at optimizer `step`, with what to try."""
    return TrainingDiverged(
        f"training diverged at optimizer step {step} of {max_steps}: {what} is {value}; nothing was saved. "
        f"Try a lower learning rate (now {args.learning_rate:g}) and check the data: record weights must be "
        "finite and >= 0."
    )


class StopOnNonFinite(TrainerCallback):
    """Stops training with `TrainingDiverged` at the first non-finite gradient or logged loss.

    The gradient is checked at every optimizer step, before the update, whatever `logging_steps` is: a NaN loss
    has a NaN gradient, so a NaN never reaches the weights. The logged loss (`logging_nan_inf_filter` off, so a
    NaN or inf step shows in its row) catches an infinite loss whose gradient is finite. With fp16 a loss scaler
    skips steps whose gradients overflow and lowers its scale: that is how it works, not divergence.
    """

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if getattr(optimizer, "scaler", None) is not None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if not math.isfinite(norm):
            raise diverged(args, state.global_step + 1, state.max_steps, "the gradient norm", norm)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        for key in ("loss", "train_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, int | float) and not math.isfinite(value):
                raise diverged(args, state.global_step, state.max_steps, f"the logged {key}", value)


def train(trainer, log_keys: Sequence[str]) -> tuple[list[dict[str, float]], int, float]:
    """Run `trainer.train()`, stopped by `TrainingDiverged` if it diverges; return the logged rows (only
    `log_keys`), the optimizer steps and the seconds."""
    start = time.perf_counter()
    trainer.add_callback(StopOnNonFinite)
    try:
        trainer.train()
    finally:  # also when it diverged: the stage folder then holds nothing of this run
        with contextlib.suppress(OSError):  # TRL makes it, no checkpoint is saved there; another process may remove it
            Path(trainer.args.output_dir).rmdir()  # only when empty
    seconds = time.perf_counter() - start
    rows = [{k: float(r[k]) for k in log_keys if k in r} for r in trainer.state.log_history if "loss" in r]
    return rows, int(trainer.state.global_step), seconds
