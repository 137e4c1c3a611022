"""Held-out preference accuracy: does a MuSC policy prefer y_w over y_l on pairs it was not trained on?

TRL logs `rewards/accuracies` on the training batches, which says the policy fits its training pairs, not that it
learnt the constraint contrast. Here a seeded share of the preference pairs is held out (`split_heldout`), and
on them the implicit DPO reward margin of `tdpo` is measured:

    margin = β [(log πθ(y_w|x) − log πref(y_w|x)) − (log πθ(y_l|x) − log πref(y_l|x))]

with each log π(y|x) = Σ_t w_t log π(y_t | x, y_<t) over the response tokens, the token weights w_t stored with
the pair (1 where there are none, or with `weighted=False`): the reward `tdpo` trains. The accuracy is the share
of pairs with a positive margin, as TRL counts `rewards/accuracies`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from mainlib.adapters import ModelBank
from mainlib.musc.tdpo import DPOSettings, preference_dataset
from mainlib.prompts import Encoded
from mainlib.scoring import ScoringSettings, score_encoded

Row = TypeVar("Row")


def split_heldout(rows: Sequence[Row], fraction: float = 0.2, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train, held out): round(fraction · n) rows drawn with `seed` are held out, each part in the input order.

    The generator is keyed by a string, so the draw is not the stream that sampled the instructions with the same
    seed (`data.sample_pairs`)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1); got {fraction}")
    held = set(random.Random(f"heldout:{seed}").sample(range(len(rows)), round(fraction * len(rows))))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


@dataclass(frozen=True)
class SequenceLogps:
    """Σ_t w_t log π(y_t | x, y_<t) of each pair's chosen and of its rejected response, under one model."""

    chosen: list[float]
    rejected: list[float]


def reward_margins(policy: SequenceLogps, reference: SequenceLogps, beta: float) -> list[float]:
    """β[(log πθ(y_w) − log πref(y_w)) − (log πθ(y_l) − log πref(y_l))] of each pair: r_w − r_l of `tdpo`."""
    return [
        beta * ((pc - rc) - (pr - rr))
        for pc, rc, pr, rr in zip(policy.chosen, reference.chosen, policy.rejected, reference.rejected, strict=True)
    ]


def preference_accuracy(margins: Sequence[float]) -> float:
    """The share of pairs whose margin is positive (a tie is not a preference, as in TRL's `rewards/accuracies`)."""
    if not margins:
        raise ValueError("preference accuracy needs at least one pair")
    return sum(m > 0 for m in margins) / len(margins)


def sequence_logps(
    model, dataset: Dataset, scoring: ScoringSettings | None = None, weighted: bool = True
) -> SequenceLogps:
    """Each pair's (token-weighted) response log-probabilities under `model`, from a `tdpo.preference_dataset`
    (the tokenisation, cut and weights `tdpo` trains on)."""
    sums: dict[str, list[float]] = {}
    for side in ("chosen", "rejected"):
        examples = [
            Encoded(prompt + ids, [-100] * len(prompt) + ids, len(prompt))
            for prompt, ids in zip(dataset["prompt_ids"], dataset[f"{side}_ids"], strict=True)
        ]
        scores = score_encoded(model, examples, scoring, desc=f"{side} log-probs")
        weights = dataset[f"{side}_weights"] if weighted else [[1.0] * len(s.logprobs) for s in scores]
        sums[side] = [
            math.fsum(w * lp for w, lp in zip(ws, s.logprobs, strict=True))
            for ws, s in zip(weights, scores, strict=True)
        ]
    return SequenceLogps(**sums)


@dataclass
class HeldoutAccuracy:
    """Preference accuracy on held-out pairs, each pair's margin, and `preference_dataset`'s counts (pairs whose
    prompt alone reaches max_length are left out, as in training)."""

    accuracy: float
    margins: list[float]
    counts: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_accuracy(
    bank: ModelBank,
    policy: str,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    settings: DPOSettings,
    reference: str | None = None,
    scoring: ScoringSettings | None = None,
    weighted: bool = True,
) -> HeldoutAccuracy:
    """The accuracy of the bank's adapter `policy` on preference rows (`tdpo`'s format), with `settings`' β and
    max_length. The reference is what the policy started from, as in `tdpo.train_bank_tdpo`: the base with adapters
    disabled (None, a fresh adapter) or the starting adapter's name."""
    dataset, counts = preference_dataset(rows, tokenizer, settings.max_length)
    with bank.use(policy) as model:
        trained = sequence_logps(model, dataset, scoring, weighted)
    with bank.use(reference) as model:
        start = sequence_logps(model, dataset, scoring, weighted)
    margins = reward_margins(trained, start, settings.beta)
    return HeldoutAccuracy(preference_accuracy(margins), margins, counts)
