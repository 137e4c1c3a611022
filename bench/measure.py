"""Timing, peak memory and random data shared by the suites."""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from bench.shapes import EOS_ID, PAD_ID
from mainlib.prompts import Encoded

GIB = 1024**3


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def free_memory() -> None:
    """Drop what the last path left behind, so the next one's peak is its own."""
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """Peak GPU memory allocated since the last `free_memory` (None on CPU)."""
    return torch.cuda.max_memory_allocated() / GIB if cuda() else None


@dataclass
class Timing:
    """Seconds of each timed repeat (warm-up excluded)."""

    seconds: list[float]

    @property
    def total(self) -> float:
        return sum(self.seconds)

    @property
    def median(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[len(ordered) // 2]


def timed(step: Callable[[int], object], warmup: int, repeats: int) -> Timing:
    """Run `step(i)` warmup + repeats times; time each of the last `repeats` (GPU synchronised)."""
    for i in range(warmup):
        step(i)
    sync()
    seconds = []
    for i in range(warmup, warmup + repeats):
        start = time.perf_counter()
        step(i)
        sync()
        seconds.append(time.perf_counter() - start)
    return Timing(seconds)


def random_examples(
    n: int, lengths: tuple[int, int], vocab: int, seed: int, prompt_share: float = 0.25
) -> list[Encoded]:
    """`n` examples of uniform random length in `lengths`; the first `prompt_share` of each is its prompt.

    Ids avoid the pad and EOS tokens, so lengths are exactly what was drawn.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(*lengths)
        ids = [rng.randrange(max(PAD_ID, EOS_ID) + 1, vocab) for _ in range(length)]
        prompt = max(1, int(length * prompt_share))
        out.append(Encoded(input_ids=ids, labels=[-100] * prompt + ids[prompt:], prompt_len=prompt))
    return out


@contextlib.contextmanager
def pretend_no_bf16() -> Iterator[None]:
    """Within: CUDA reports no bf16, so mainlib (and TRL) pick fp16 compute, as on a T4."""
    saved = torch.cuda.is_bf16_supported
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: False
    try:
        yield
    finally:
        torch.cuda.is_bf16_supported = saved


def ratio(ours: float | None, stock: float | None) -> float | None:
    return None if not ours or not stock else ours / stock


def close(got: float, want: float, rel: float, abs_: float = 0.0) -> dict:
    """A correctness record: both values, their difference, the tolerance, and whether it holds."""
    diff = abs(got - want)
    return {
        "ours": got,
        "reference": want,
        "abs_diff": diff,
        "tolerance": max(abs_, rel * abs(want)),
        "ok": diff <= max(abs_, rel * abs(want)),
    }
