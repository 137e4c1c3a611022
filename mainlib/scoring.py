"""Likelihood scoring: per-token log p(target | prompt) and its length-normalised mean, batched.

Pairs are tokenised exactly as in training (`prompts.encode`), sorted by length and batched under a token
budget. The LM head is applied only at the positions that predict target tokens, in chunks, so the
(batch, length, vocabulary) logits tensor is never built: memory is O(target tokens x vocabulary / chunks).

Batching pays on a GPU (fewer, larger kernels; 4-bit weights dequantised once per batch, not per pair) but
not on a CPU, which is compute-bound already: on 2 cores, SmolLM2-135M shape, 8 pairs of 384 tokens, a
batch of 8 took 5.8 s and one pair at a time 4.8 s (no padding in either). So the default is one pair per
forward on CPU (`python -m bench score --profile cpu` measures it against a naive loop).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mainlib.batching import token_budget_batches
from mainlib.data import Pair
from mainlib.models import bf16_autocast
from mainlib.prompts import Direction, Encoded, encode


@dataclass
class ScoringSettings:
    """Batching of likelihood scoring; it changes speed and memory, not the scores."""

    token_budget: int = field(
        default=8192, metadata={"help": "rows x longest length per forward pass", "range": "[1, inf)"}
    )
    max_batch_size: int | None = field(
        default=None,
        metadata={"help": "rows per forward pass at most; None: 64 on CUDA, 1 on CPU", "range": "[1, inf)"},
    )
    head_chunk: int = field(default=1024, metadata={"help": "target positions per LM-head chunk", "range": "[1, inf)"})


@dataclass(frozen=True)
class TargetScore:
    """log p of each target token, in order (EOS included when the target has it)."""

    logprobs: tuple[float, ...]

    @property
    def mean(self) -> float:
        """Length-normalised log-likelihood (nats per token)."""
        return sum(self.logprobs) / max(1, len(self.logprobs))


def backbone_and_head(model):
    """The transformer body (LoRA layers included) and the output projection of a causal LM or PeftModel."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


@torch.no_grad()
def target_states(
    model, examples: Sequence[Encoded], settings: ScoringSettings | None = None, desc: str = "encoding"
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each example (in batches, not in input order): (index, hidden states that predict its target
    tokens (n_target, d), those target token ids (n_target,)). The LM head is left to the caller."""
    settings = settings or ScoringSettings()
    backbone, _ = backbone_and_head(model)
    device = next(model.parameters()).device
    rows = settings.max_batch_size or (64 if device.type == "cuda" else 1)
    batches = token_budget_batches([len(e.input_ids) for e in examples], settings.token_budget, rows)
    with tqdm(total=len(examples), desc=desc, unit="pair") as bar:
        for batch in batches:
            width = max(len(examples[i].input_ids) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            labels = torch.full((len(batch), width), -100, dtype=torch.long, device=device)
            for row, i in enumerate(batch):  # right padding: positions of real tokens stay 0..n-1
                n = len(examples[i].input_ids)
                ids[row, :n] = torch.tensor(examples[i].input_ids)
                mask[row, :n] = 1
                labels[row, :n] = torch.tensor(examples[i].labels)
            with bf16_autocast(model):
                hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            # The state at position t predicts token t+1: keep the states whose next token is a target.
            targets = labels[:, 1:]
            for row, i in enumerate(batch):
                keep = targets[row] != -100
                yield i, hidden[row, :-1][keep], targets[row][keep]
            bar.update(len(batch))


def chunked_log_softmax(head, states: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, log-softmax over the vocabulary in fp32) for `chunk` positions at a time."""
    for start in range(0, len(states), chunk):
        yield start, torch.log_softmax(head(states[start : start + chunk]).float(), dim=-1)


@torch.no_grad()
def score_encoded(
    model, examples: Sequence[Encoded], settings: ScoringSettings | None = None, desc: str = "scoring"
) -> list[TargetScore]:
    """Score already-encoded examples; results in input order."""
    settings = settings or ScoringSettings()
    if not examples:
        return []
    _, head = backbone_and_head(model)
    was_training = model.training
    model.eval()
    results: list[TargetScore | None] = [None] * len(examples)
    for i, states, wanted in target_states(model, examples, settings, desc):
        parts = [
            logp.gather(-1, wanted[start : start + len(logp), None]).squeeze(-1)
            for start, logp in chunked_log_softmax(head, states, settings.head_chunk)
        ]
        results[i] = TargetScore(tuple(torch.cat(parts).tolist()) if parts else ())
    model.train(was_training)
    return [r for r in results if r is not None]


def score_pairs(
    model,
    tokenizer: PreTrainedTokenizerBase,
    direction: Direction,
    pairs: Sequence[Pair],
    settings: ScoringSettings | None = None,
    system: str | None = None,
    unconditional: bool = False,
) -> list[TargetScore]:
    """log p_f(y | x) (forward) or log p_r(x | y) (reverse) for each pair.

    `unconditional=True` empties the conditioning side (the instruction for forward, the response in the
    reverse template) to get log p(target | ∅), the baseline that PMI normalisation subtracts.
    """
    if unconditional:  # blank the conditioning side; the target side is untouched
        pairs = [replace(p, instruction="") if direction == "forward" else replace(p, response="") for p in pairs]
    examples = [encode(tokenizer, direction, p.instruction, p.response, system) for p in pairs]
    label = f"{direction} scoring" + (" (unconditional)" if unconditional else "")
    return score_encoded(model, examples, settings, desc=label)
