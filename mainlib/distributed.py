"""The processes of one `accelerate launch` (or `torchrun`): which one this is, and how they meet.

One process (plain `python`, a notebook): rank 0 of 1, and every function here returns at once. Several
(`accelerate launch --num_processes N -m mainlib.run ...`): `torch.distributed` is initialised through
accelerate's `PartialState`, the same state transformers' Trainer uses (NCCL on GPUs, gloo on CPU), and
the pipeline uses it in three ways (docs/SCALING.md):

- training stages: every process trains, Trainer's own DDP (FSDP, DeepSpeed through accelerate configs);
  a recipe's `batch_size` is the global micro-batch, split evenly (`per_process_batch`);
- sharded data stages: shard i is computed by process i mod N, then all wait for each other (`barrier`);
- everything that writes a run's bookkeeping (manifests, stage folders, the lock) happens on the main
  process (`on_main`), and the others get its result, or its error.

A run directory must be on storage every process sees (one node: any disk; several: a shared filesystem).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


def world_size() -> int:
    """How many processes this job has: `WORLD_SIZE`, set by accelerate and torchrun (1 when not set)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its own machine: the GPU it uses is `cuda:{local_rank}`."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def shards_parameters() -> bool:
    """Whether the launch shards the model's parameters over its processes (an accelerate config with FSDP or
    DeepSpeed): a 4-bit model must then store its packed weights in the compute dtype (peft's FSDP/ZeRO-3 + QLoRA
    recipe), so the wrapper can flatten them with the rest."""
    return any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true" for name in ("FSDP", "DEEPSPEED"))


WAIT = timedelta(hours=6)  # the longest one process may wait for another (e.g. the main one writing a round)


@cache
def _start() -> None:
    """Start `torch.distributed` once, through accelerate (its process group is the one Trainer then uses), with
    a timeout long enough for main-only steps (torch's default, 10-30 minutes, would cut a round's generation)."""
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)  # cpu: gloo between CPU processes


def _collective() -> Any:
    """`torch.distributed`, started, when there are several processes; None in a single one."""
    if world_size() == 1:
        return None
    _start()
    import torch.distributed as dist

    return dist


def barrier() -> None:
    """Wait until every process gets here (a no-op in a single process)."""
    if dist := _collective():
        dist.barrier()


def broadcast(value: T) -> T:
    """The main process's `value` (any picklable object), in every process."""
    if not (dist := _collective()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every process's `value`, in rank order, in every process."""
    if not (dist := _collective()):
        return [value]
    boxes: list[Any] = [None] * world_size()
    dist.all_gather_object(boxes, value)
    return boxes


class OtherProcessFailed(RuntimeError):
    """The main process failed at a step the others were waiting for; its error is in the message."""


def on_main(work: Callable[[], T]) -> T:
    """Run `work` on the main process only and return its result in every process.

    When `work` fails there, the others raise `OtherProcessFailed` naming the error (instead of waiting at
    the next collective until a timeout), and the main process raises the error itself.
    """
    if world_size() == 1:
        return work()
    outcome: tuple[bool, Any] | None = None
    error: BaseException | None = None
    if is_main():
        try:
            outcome = (True, work())
        except BaseException as e:
            error, outcome = e, (False, f"{type(e).__name__}: {e}")
    ok, value = broadcast(outcome)
    if error is not None:
        raise error
    if not ok:
        raise OtherProcessFailed(f"the main process failed: {value}")
    return value


def per_process_batch(batch_size: int, what: str) -> int:
    """A global micro-batch of `batch_size` examples split evenly over the processes (what each one trains on)."""
    n = world_size()
    if batch_size % n:
        raise ValueError(
            f"{what}={batch_size} cannot be split evenly over {n} processes: the recipe's batch size is the global "
            f"micro-batch, so it must be a multiple of the process count (e.g. {batch_size + n - batch_size % n})"
        )
    return batch_size // n
