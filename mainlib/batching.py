"""Length-sorted batches under a token budget, shared by generation and scoring."""

from __future__ import annotations

from collections.abc import Sequence


def token_budget_batches(
    lengths: Sequence[int], token_budget: int, max_batch_size: int, extra: int = 0
) -> list[list[int]]:
    """Group indices shortest first so that rows x (longest length + extra) <= token_budget per batch.

    `extra` is what every row grows by (max_new_tokens when generating). A row longer than the budget
    on its own still gets a batch of one.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[i] + extra  # sorted, so the newest row is the widest of its batch
        if current and ((len(current) + 1) * width > token_budget or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
