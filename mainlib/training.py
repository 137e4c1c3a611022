"""What every mainlib trainer (weighted SFT, token-weighted DPO) sets and reads the same way."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import SchedulerType

SCHEDULERS = tuple(s.value for s in SchedulerType)  # the `scheduler` values both trainers accept


def run_arguments(output_dir: str | Path, seed: int) -> dict[str, Any]:
    """TRL config fields shared by all trainers: precision for the device, seeds, no checkpoints, no loggers."""
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return dict(
        output_dir=str(output_dir),
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        fp16=cuda and not bf16,
        use_cpu=not cuda,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
    )


def train(trainer, log_keys: Sequence[str]) -> tuple[list[dict[str, float]], int, float]:
    """Run `trainer.train()`; return the logged rows (only `log_keys`), the optimizer steps and the seconds."""
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    output = Path(trainer.args.output_dir)
    if output.is_dir() and not any(output.iterdir()):  # TRL makes it, but no checkpoint is saved there
        output.rmdir()
    rows = [{k: float(r[k]) for k in log_keys if k in r} for r in trainer.state.log_history if "loss" in r]
    return rows, int(trainer.state.global_step), seconds
