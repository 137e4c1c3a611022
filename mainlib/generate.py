"""Batched generation: one engine for every stage that writes text (examples, synthesis, EM rounds, MuSC).

Prompts are sorted by length and left-padded, and batches are sized by a token budget
(rows x (longest prompt + max_new_tokens) <= token_budget), so short prompts share big batches and long
ones don't run out of memory. Outputs come back in the input order, each with its finish reason:
`eos` (the model stopped) or `length` (it hit max_new_tokens). Same seed, same outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mainlib.batching import token_budget_batches
from mainlib.data import Pair
from mainlib.prompts import Direction, build_prompt


@dataclass
class GenerationSettings:
    """Sampling settings. temperature 0 means greedy decoding."""

    max_new_tokens: int = field(default=256, metadata={"help": "tokens to write at most"})
    temperature: float = field(default=0.7, metadata={"help": "0 = greedy; Humpback used 0.7"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    token_budget: int = field(default=16384, metadata={"help": "rows x (prompt + new tokens) per batch"})
    max_batch_size: int = field(default=64, metadata={"help": "rows per batch at most"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: Literal["eos", "length"]
    new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_batches(lengths: Sequence[int], settings: GenerationSettings) -> list[list[int]]:
    """Indices grouped into batches, shortest prompts first, each within the token budget."""
    return token_budget_batches(lengths, settings.token_budget, settings.max_batch_size, settings.max_new_tokens)


@torch.no_grad()
def generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings,
    desc: str = "generating",
) -> list[Generation]:
    """Complete every prompt (already formatted, e.g. by `prompts.build_prompt`); results in input order."""
    if not prompts:
        return []
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    eos_ids = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, list) else [tokenizer.eos_token_id]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(settings.seed)
    results: list[Generation | None] = [None] * len(prompts)
    sampling = settings.temperature > 0
    batches = plan_batches([len(e) for e in encoded], settings)
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for batch in batches:
            width = max(len(encoded[i]) for i in batch)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch], device=device)
            attention = torch.tensor(
                [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch], device=device
            )
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=settings.max_new_tokens,
                do_sample=sampling,
                temperature=settings.temperature if sampling else None,
                top_p=settings.top_p if sampling else None,
                top_k=None,
                eos_token_id=eos_ids,
                pad_token_id=pad,
                use_cache=True,
            )
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()
                stop = next((k for k, t in enumerate(new) if t in eos_ids), None)
                tokens = new if stop is None else new[:stop]
                results[i] = Generation(
                    text=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    finish_reason="length" if stop is None else "eos",
                    new_tokens=len(tokens) + (0 if stop is None else 1),
                )
            bar.update(len(batch))
    model.train(was_training)
    return [r for r in results if r is not None]


def complete_pairs(
    model,
    tokenizer: PreTrainedTokenizerBase,
    direction: Direction,
    pairs: Sequence[Pair],
    settings: GenerationSettings,
    system: str | None = None,
) -> list[Generation]:
    """Forward: write a response for each pair's instruction. Reverse: write an instruction for its response."""
    prompts = [build_prompt(tokenizer, direction, p.instruction, p.response, system) for p in pairs]
    return generate(model, tokenizer, prompts, settings, desc=f"{direction} generation")
