"""Timing, peak memory and random data shared by the suites."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.shapes import EOS_ID, PAD_ID
from mainlib.prompts import Encoded

GIB = 1024**3


def cuda() -> bool:
    return torch.cuda.is_available()


def stock_quantization() -> str:
    """How a stock path loads the model: the QLoRA recipe's 4-bit NF4 on CUDA, transformers' fp32 on CPU (ours
    load with mainlib's default, `auto`, which on a CPU with bf16 instructions means bf16 weights)."""
    return "4bit" if cuda() else "none"


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def free_memory() -> None:
    """Drop what the last path left behind, so the next one's peak is its own.

    On CPU the peak is the process's peak resident set (VmHWM): glibc's `malloc_trim` first hands freed heap back
    to the OS, then writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    """
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_gib() -> float | None:
    """Peak GPU memory allocated, or on CPU the peak resident set, since the last `free_memory` (None where the
    platform has no counter)."""
    if cuda():
        return torch.cuda.max_memory_allocated() / GIB
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB  # kB
    return None


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


def in_turns(steps: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, dict]:
    """Time paths in turns: each warmed up, then `repeats` rounds that run every path once. Each `step()` returns
    the work it did (e.g. tokens written); per path: the median rate over the rounds, the totals and peak memory.

    Why in turns: on a shared machine a slow spell of a minute halves whatever runs then; timing all of one path
    before the next turned such spells into 15-30% swings of a ratio between runs.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    work: dict[str, list[float]] = {name: [] for name in steps}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            free_memory()
            sync()
            start = time.perf_counter()
            work[name].append(step())
            sync()
            seconds[name].append(time.perf_counter() - start)
            peaks[name].append(peak_gib() or 0.0)
    return {
        name: {
            "seconds": sum(seconds[name]),
            "work": sum(work[name]),
            "tokens_per_s": Timing([w / s for w, s in zip(work[name], seconds[name], strict=True)]).median,
            "peak_gib": max(peaks[name]) or None,
        }
        for name in steps
    }


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


# --------------------------------------------------------------------------------------------------
# Where the time goes (--trace): the heaviest operators of one more call, and how busy the device was
# --------------------------------------------------------------------------------------------------

TRACE = {"on": False}  # set by `python -m bench --trace`


def _self_time(event) -> float:
    """Self time in microseconds on the device (GPU) or, without one, on the CPU."""
    if cuda():
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))
    return float(event.self_cpu_time_total)


def trace(fn: Callable[[], object], top: int = 12) -> dict | None:
    """Profile one call of `fn` when tracing is on: its top operators by self time, and device-busy share.

    On a GPU, `device_busy` = summed kernel time / wall time of the call: well under 1 means the call is
    bound by launches and Python, not by the GPU (what decides between CUDA graphs and bigger batches).
    """
    if not TRACE["on"]:
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync()
    wall = time.perf_counter() - start
    events = list(prof.key_averages())
    total = sum(_self_time(e) for e in events) or 1.0
    heaviest = sorted(events, key=_self_time, reverse=True)[:top]
    return {
        "wall_s": wall,
        "timed_on": "cuda" if cuda() else "cpu",
        "device_busy": (total / 1e6) / wall if cuda() else None,
        "top_ops": [
            {"op": e.key, "self_ms": _self_time(e) / 1e3, "share": _self_time(e) / total, "calls": e.count}
            for e in heaviest
        ],
    }
