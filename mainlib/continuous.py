"""Greedy decoding with continuous batching: a finished row's slot goes to the next prompt.

Why: lm-eval's `HFLM` generates in fixed batches, and a batch runs until its longest member stops. On IFEval
(up to 1,280 new tokens) a small instruct model loops to the cap on some prompts, so almost every batch runs
the full 1,280 steps; at batch 1 each token reads all the weights once (SmolLM2-135M on 2 CPU cores: ~54 ms
per token, memory-bound, against ~100 ms per step for 8 rows). Here up to `slots` rows decode together and a
row that stops hands its slot to the next prompt, so every step does `slots` rows of useful work.

The cache: each layer's keys and values live in one buffer [rows, heads, capacity, head_dim], right-aligned:
row r holds its tokens in columns [first_r, end) and the padding to their left is masked, exactly as in HF's
left-padded `generate`. A step writes one column in place (`SlotLayer.update`; the dynamic cache's
`torch.cat` copies the whole cache every step). Finished rows stay in the batch, ignored, until enough slots
are free; then `_rebuild` drops them, prefills the next prompts (left-padded) and right-aligns old and new
rows to one end column, trimming the columns no row uses.

Results equal HF's greedy `generate` token for token up to float rounding (the batch composition changes the
order of some sums); `tests/test_continuous.py` checks this on the tiny model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class SlotLayer(DynamicLayer):
    """One layer's K/V in preallocated buffers; `update` writes the new columns in place at `end`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, end: int) -> None:
        super().__init__()
        self.keys_buffer, self.values_buffer, self.end = keys, values, end
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        self.keys_buffer[:, :, self.end : self.end + n] = key_states
        self.values_buffer[:, :, self.end : self.end + n] = value_states
        self.end += n
        self.keys, self.values = self.keys_buffer[:, :, : self.end], self.values_buffer[:, :, : self.end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.end + query_length, 0

    def get_max_length(self) -> int:
        return self.keys_buffer.shape[-2]


@dataclass
class _Row:
    index: int  # position of the prompt in the input
    tokens: list[int] = field(default_factory=list)  # generated so far
    done: bool = False


@dataclass
class _Batch:
    rows: list[_Row]
    layers: list[SlotLayer]
    mask: torch.Tensor  # [rows, capacity] 1 where a column holds one of the row's tokens

    @property
    def end(self) -> int:
        return self.layers[0].end


def _prefill(model, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """Left-padded prefill of new prompts: (their cache, their mask, their first greedy token)."""
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[r, width - len(prompt) :] = 1
    cache = DynamicCache()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache, logits_to_keep=1)
    return cache, mask, out.logits[:, -1].argmax(-1)


def _rebuild(model, batch: _Batch | None, new: list[tuple[int, Sequence[int]]], pad_id: int, headroom: int) -> _Batch:
    """Keep the unfinished rows, add `new` prompts, right-align everyone to one end column, trim the rest."""
    keep = [r for r, row in enumerate(batch.rows) if not row.done] if batch else []
    parts = []  # (layer tensors [(k, v)...], mask, width) of the kept rows and of the new rows
    if keep:
        index = torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask[index, : batch.end]
        width = int((mask.cumsum(-1) == 0).sum(-1).min())  # leading columns no kept row uses
        mask = mask[:, width:]
        kv = [(layer.keys[index, :, width:], layer.values[index, :, width:]) for layer in batch.layers]
        parts.append((kv, mask))
    first_tokens = None
    if new:
        cache, mask, first_tokens = _prefill(model, [p for _, p in new], pad_id)
        parts.append(([(layer.keys, layer.values) for layer in cache.layers], mask))
    length = max(m.shape[1] for _, m in parts)
    rows = len(keep) + len(new)
    k0 = parts[0][0][0][0]
    layers, mask_out, r0 = [], torch.zeros((rows, length + headroom), dtype=torch.long, device=k0.device), 0
    buffers = [
        (
            k0.new_zeros((rows, k.shape[1], length + headroom, k.shape[3])),
            k0.new_zeros((rows, v.shape[1], length + headroom, v.shape[3])),
        )
        for k, v in parts[0][0]
    ]
    for kv, mask in parts:
        n, w = mask.shape
        mask_out[r0 : r0 + n, length - w : length] = mask
        for (kb, vb), (k, v) in zip(buffers, kv, strict=True):
            kb[r0 : r0 + n, :, length - w : length] = k
            vb[r0 : r0 + n, :, length - w : length] = v
        r0 += n
    layers = [SlotLayer(kb, vb, length) for kb, vb in buffers]
    kept_rows = [batch.rows[r] for r in keep] if batch else []
    new_rows = [_Row(index, [int(t)]) for (index, _), t in zip(new, first_tokens if new else [], strict=True)]
    return _Batch(kept_rows + new_rows, layers, mask_out)


def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    slots: int = 16,
    stop: Callable[[list[int]], bool] | None = None,
    on_done: Callable[[int, list[int]], None] | None = None,
    progress: bool = True,
) -> list[list[int]]:
    """Greedy continuation token ids of each prompt (token ids), in input order.

    A row stops at a token in `eos_ids` (kept, as `generate` keeps it), after `max_new_tokens`, or when
    `stop(tokens)` says so (stop strings). `on_done(index, tokens)` is called as each prompt finishes.
    """
    queue = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # pop() takes the longest first
    results: list[list[int] | None] = [None] * len(prompts)
    refill_at = max(1, slots // 4)  # rebuild once this many slots are free (a rebuild copies the cache)
    batch: _Batch | None = None
    bar = tqdm(total=len(prompts), disable=not progress, desc="generate (continuous batching)")

    def finish(row: _Row) -> None:
        row.done = True
        results[row.index] = row.tokens
        bar.update(1)
        if on_done:
            on_done(row.index, row.tokens)

    def finished(row: _Row) -> bool:
        return row.tokens[-1] in eos_ids or len(row.tokens) >= max_new_tokens or bool(stop and stop(row.tokens))

    with torch.no_grad():
        while queue or (batch and any(not row.done for row in batch.rows)):
            dead = sum(row.done for row in batch.rows) if batch else slots
            alive = (len(batch.rows) - dead) if batch else 0
            if batch is None or alive == 0 or (queue and slots - alive >= refill_at) or dead >= refill_at:
                new = [(i, prompts[i]) for i in (queue.pop() for _ in range(min(len(queue), slots - alive)))]
                batch = _rebuild(model, batch, new, pad_id, headroom=max_new_tokens)
                for row in batch.rows[alive:]:
                    if finished(row):
                        finish(row)
                continue
            _step(model, batch)
            for row in batch.rows:
                if not row.done and finished(row):
                    finish(row)
    bar.close()
    return results  # type: ignore[return-value]


def _step(model, batch: _Batch) -> None:
    """One decode step for every row (finished rows too: they are dropped at the next rebuild)."""
    end = batch.end
    batch.mask[:, end] = 1
    last = torch.tensor([[row.tokens[-1]] for row in batch.rows], device=batch.mask.device)
    position_ids = batch.mask[:, :end].sum(-1, keepdim=True)  # tokens before this one, per row
    cache = Cache(layers=batch.layers)
    out = model(
        input_ids=last,
        attention_mask=batch.mask[:, : end + 1],
        position_ids=position_ids,
        past_key_values=cache,
        logits_to_keep=1,
    )
    for row, token in zip(batch.rows, out.logits[:, -1].argmax(-1).tolist(), strict=True):
        if not row.done:
            row.tokens.append(token)
