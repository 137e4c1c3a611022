"""Timing real `trainer.train()` steps: a callback times each optimiser step, a hook counts its tokens."""

from __future__ import annotations

import time

from transformers import TrainerCallback

from bench.measure import Timing, sync


class StepClock(TrainerCallback):
    """Seconds and real (non-pad) input tokens of every optimiser step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self._start = 0.0
        self._tokens = 0

    def count(self, module, args, kwargs) -> None:  # forward pre-hook on the trained model
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if ids is not None:
            self._tokens += int(mask.sum()) if mask is not None else ids.numel()

    def on_step_begin(self, args, state, control, **kwargs):
        sync()
        self._tokens = 0
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        sync()
        self.seconds.append(time.perf_counter() - self._start)
        self.tokens.append(self._tokens)


def train_steps(trainer, warmup: int, steps: int) -> dict:
    """Run `warmup + steps` optimiser steps with `trainer.train()`; report the last `steps`.

    Tokens are counted at the model's top-level forward (once per micro-batch), so a trainer that
    runs a second forward per step (a DPO reference) counts it too; DPO suites use step time.
    """
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.args.max_steps = warmup + steps
    handle = trainer.model.register_forward_pre_hook(clock.count, with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    timing = Timing(clock.seconds[warmup:])
    tokens = sum(clock.tokens[warmup:])
    return {
        "steps": len(timing.seconds),
        "seconds": timing.total,
        "step_seconds_median": timing.median,
        "tokens": tokens,
        "tokens_all_steps": sum(clock.tokens),  # warm-up included: the whole dataset, once
        "tokens_per_s": tokens / timing.total if timing.total else None,
        "grad_checkpointing": bool(getattr(trainer.args, "gradient_checkpointing", False)),
        "dtype": str(next(p for p in trainer.model.parameters() if p.requires_grad).dtype),
    }


def one_more_step(trainer) -> None:
    """One optimiser step through `trainer.train()` again (for `measure.trace`)."""
    trainer.args.max_steps = 1
    trainer.train()
