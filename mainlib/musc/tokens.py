"""Fine granularity of MuSC: how much each response token depends on the constraints (ALGORITHMS.md §2).

For every token t of a response y, compare the frozen reference model's next-token distributions under
the clean instruction x and the corrupted one x′ (same response prefix y_<t):

    kl          m_t = KL(p(·|x′, y_<t) ‖ p(·|x, y_<t))
    reverse_kl  m_t = KL(p(·|x, y_<t) ‖ p(·|x′, y_<t))
    bikl        m_t = the mean of the two
    pmi         m_t = log p(y_t | x, y_<t) − log p(y_t | ∅, y_<t)      (x′ unused; ∅ = empty instruction)

and turn it into a weight  w_t = clip(m_t / mean_t(m_t), 0, w_max)  (mean ≈ 1, in [0, w_max]). When the
mean is not positive (x′ = x, or a PMI that is negative on average) there is no constraint signal and
every weight is 0; `weigh_pairs` then follows `zero_weights` (weight 1 on every token, or drop the pair),
since a sequence of zeros would silently leave its pair one-sided. Prompt tokens are never weighted: the
weights cover the response tokens exactly as `prompts.encode` tokenises them (EOS included), and
`sequence_weights` pads the prompt with zeros.

Distributions are computed `head_chunk` positions at a time, so no (length, vocabulary) tensor is built for
a whole sequence, let alone a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from mainlib.prompts import Encoded, encode
from mainlib.scoring import ScoringSettings, backbone_and_head, chunked_log_softmax, target_states

WeightMode = Literal["none", "kl", "reverse_kl", "bikl", "pmi"]
WEIGHT_MODES = ("none", "kl", "reverse_kl", "bikl", "pmi")
ZeroWeights = Literal["uniform", "drop"]
ZERO_WEIGHTS = ("uniform", "drop")


@dataclass
class TokenWeightSettings:
    """How much each response token counts in the DPO loss (ALGORITHMS.md §2, fine granularity)."""

    mode: WeightMode = field(
        default="kl",
        metadata={"help": "none (plain DPO) | kl | reverse_kl | bikl | pmi", "name": "weight_mode"},
    )
    w_max: float = field(default=2.0, metadata={"help": "upper clip of a token weight", "range": "(0, inf)"})
    zero_weights: ZeroWeights = field(
        default="uniform",
        metadata={
            "help": "a response whose weights are all 0 (no constraint signal): uniform = weight 1 on each of its "
            "tokens (plain DPO for it); drop = drop the pair"
        },
    )
    scoring: ScoringSettings = field(
        default_factory=ScoringSettings, metadata={"help": "batching of the reference model's forward passes"}
    )


@dataclass(frozen=True)
class TokenWeights:
    """Weights of one response's tokens (aligned with `token_ids`), and the raw per-token measure."""

    token_ids: tuple[int, ...]
    weights: tuple[float, ...]
    measure: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def normalise(measure: torch.Tensor, w_max: float) -> torch.Tensor:
    """w_t = clip(m_t / mean(m), 0, w_max); all zeros when mean(m) <= 0."""
    mean = measure.mean() if len(measure) else torch.tensor(0.0)
    if mean <= 0:
        return torch.zeros_like(measure)
    return (measure / mean).clamp(0.0, w_max)


def _per_token_measure(
    head, states: torch.Tensor, other: torch.Tensor, wanted: torch.Tensor, mode: str, chunk: int
) -> torch.Tensor:
    """m_t for one response: `states` under x, `other` under x′ (or ∅ for pmi), chunk by chunk."""
    parts = []
    for (start, logp), (_, logq) in zip(
        chunked_log_softmax(head, states, chunk), chunked_log_softmax(head, other, chunk), strict=True
    ):
        if mode == "pmi":
            ids = wanted[start : start + len(logp), None]
            parts.append((logp.gather(-1, ids) - logq.gather(-1, ids)).squeeze(-1))
            continue
        kl_corrupt_clean = (logq.exp() * (logq - logp)).sum(-1)  # KL(p(·|x′) ‖ p(·|x))
        if mode == "kl":
            parts.append(kl_corrupt_clean)
            continue
        kl_clean_corrupt = (logp.exp() * (logp - logq)).sum(-1)
        parts.append(kl_clean_corrupt if mode == "reverse_kl" else (kl_corrupt_clean + kl_clean_corrupt) / 2)
    return torch.cat(parts).clamp(min=0.0) if mode != "pmi" else torch.cat(parts)


@torch.no_grad()
def token_weights(
    model,
    tokenizer: PreTrainedTokenizerBase,
    instructions: Sequence[str],
    contrasts: Sequence[str],
    responses: Sequence[str],
    settings: TokenWeightSettings | None = None,
) -> list[TokenWeights]:
    """Weights of each response's tokens, from the clean `instructions[i]` vs `contrasts[i]` (x′).

    For `pmi` the contrast is ignored and the instruction is emptied instead. `model` should be the
    frozen reference (for a PeftModel: call this inside `model.disable_adapter()`).
    """
    settings = settings or TokenWeightSettings()
    if settings.mode not in WEIGHT_MODES:
        raise ValueError(f"mode must be one of {', '.join(WEIGHT_MODES)}; got {settings.mode!r}")
    n = len(responses)
    if not len(instructions) == len(contrasts) == n:
        raise ValueError("instructions, contrasts and responses must have the same length")
    clean = [encode(tokenizer, "forward", x, y) for x, y in zip(instructions, responses, strict=True)]
    if settings.mode == "none":
        return [TokenWeights(tuple(e.target_ids), (1.0,) * len(e.target_ids), ()) for e in clean]
    second = [c if settings.mode != "pmi" else "" for c in contrasts]
    other: list[Encoded] = [encode(tokenizer, "forward", x, y) for x, y in zip(second, responses, strict=True)]
    _, head = backbone_and_head(model)
    was_training = model.training
    model.eval()
    states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, hidden, wanted in target_states(model, clean + other, settings.scoring, desc="token weights"):
        states[i] = (hidden, wanted)
    out = []
    for i in range(n):
        (h_clean, wanted), (h_other, wanted_other) = states[i], states[n + i]
        if not torch.equal(wanted, wanted_other):
            raise ValueError(f"response {i} tokenises differently after x and x′; cannot compare token by token")
        measure = _per_token_measure(head, h_clean, h_other, wanted, settings.mode, settings.scoring.head_chunk)
        weights = normalise(measure, settings.w_max)
        out.append(TokenWeights(tuple(wanted.tolist()), tuple(weights.tolist()), tuple(measure.tolist())))
    model.train(was_training)
    return out


def sequence_weights(encoded: Encoded, weights: TokenWeights) -> list[float]:
    """Weights over the whole prompt + response sequence: 0 on every prompt token."""
    if tuple(encoded.target_ids) != weights.token_ids:
        raise ValueError("these weights belong to another tokenisation of the response")
    return [0.0] * encoded.prompt_len + list(weights.weights)


def is_zero(weights: TokenWeights) -> bool:
    """Whether a response carries no weight at all (mean m_t <= 0): its DPO reward would be 0 whatever it says."""
    return not any(weights.weights)


def uniform(weights: TokenWeights) -> TokenWeights:
    """Weight 1 on every token (plain DPO for this response); the measure is kept, to show why."""
    return replace(weights, weights=(1.0,) * len(weights.token_ids))


def weigh_pairs(
    rows: Sequence[Mapping[str, Any]],
    chosen: Sequence[TokenWeights],
    rejected: Sequence[TokenWeights],
    zero_weights: ZeroWeights,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The preference rows with `chosen_weights` / `rejected_weights`, and counts.

    A response with all weights 0 would make its pair one-sided (only the other response moves the loss), so
    it gets weight 1 everywhere (`uniform`) or its pair is dropped (`drop`); `zero_weight_sequences` counts
    such responses, `dropped_zero_weights` the pairs dropped.
    """
    if zero_weights not in ZERO_WEIGHTS:
        raise ValueError(f"zero_weights must be one of {', '.join(ZERO_WEIGHTS)}; got {zero_weights!r}")
    out, counts = [], {"pairs": len(rows), "zero_weight_sequences": 0, "dropped_zero_weights": 0}
    for row, *pair in zip(rows, chosen, rejected, strict=True):
        zero = [is_zero(w) for w in pair]
        counts["zero_weight_sequences"] += sum(zero)
        if any(zero) and zero_weights == "drop":
            counts["dropped_zero_weights"] += 1
            continue
        w_chosen, w_rejected = (uniform(w) if z else w for w, z in zip(pair, zero, strict=True))
        out.append({**row, "chosen_weights": w_chosen.to_dict(), "rejected_weights": w_rejected.to_dict()})
    counts["kept"] = len(out)
    return out, counts
