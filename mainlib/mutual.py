"""MAIN: mutual-alignment rounds, synthesis, mutual filtering, and the Humpback baseline (ALGORITHMS.md §1, §3).

Read top to bottom:
1. `alpha_schedule`: α_k for round k (constant / linear / cosine).
2. `round_update`: one EM round: the reverse model writes instructions for the seed responses and the
   forward model trains on seed + those (weight α_k); then the forward model writes responses for the seed
   instructions and the reverse model trains on seed + those.
3. `synthesis_row` / `mark_duplicates`: what the reverse model wrote for each pool response; empty, truncated
   and duplicate instructions are dropped, each with its reason (the pipeline's synthesize stage streams them).
4. `score_pool` and `filter_scores`: s_f, s_r (plain or PMI-normalised), combined as λ·z(s_f) + (1−λ)·z(s_r);
   or a seeded uniform random score (the `random` baseline).
5. `select`: the top `ceil(top_fraction · n)` pairs, or those above `threshold`.
6. `humpback_ratings`: the seed model rates each pair 1–5 (the baseline filter).
7. `ground_truth_auc`: how well each score separates true pairs from shuffled ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from mainlib import distributed
from mainlib.adapters import ModelBank
from mainlib.data import Pair, normalize_text
from mainlib.generate import Generation, GenerationSettings, complete_pairs, generate
from mainlib.parameters import check
from mainlib.prompts import build_prompt
from mainlib.scoring import ScoringSettings, score_pairs
from mainlib.sft import SFTResult, SFTSettings, train_sft, weight_pairs

Schedule = Literal["constant", "linear", "cosine"]
FilterMethod = Literal["mutual", "forward", "reverse", "random", "humpback", "none"]
Normalization = Literal["pmi", "none"]
FILTER_METHODS = ("mutual", "forward", "reverse", "random", "humpback", "none")
SYNTHESIS_DROP_REASONS = ("empty", "truncated", "duplicate")


@dataclass
class MainSettings:
    """Every open choice of MAIN, with the defaults of ALGORITHMS.md §1 and §3."""

    rounds: int = field(
        default=1,
        metadata={"help": "K, mutual-alignment rounds (0: synthesis uses the seed models)", "range": "[0, inf)"},
    )
    alpha_schedule: Schedule = field(
        default="linear", metadata={"help": "α_k over the rounds: constant | linear | cosine"}
    )
    alpha_start: float = field(
        default=0.1, metadata={"help": "α in round 0 (and the constant value)", "range": "[0, 1]"}
    )
    alpha_end: float = field(default=0.5, metadata={"help": "α in round K-1 (linear, cosine)", "range": "[0, 1]"})
    filter_method: FilterMethod = field(
        default="mutual",
        metadata={
            "help": "mutual | forward | reverse (ablations) | random (as many pairs, drawn with `seed`) | "
            "humpback (baseline) | none"
        },
    )
    score_normalization: Normalization = field(
        default="pmi", metadata={"help": "pmi: minus the unconditional likelihood; none: the plain likelihood"}
    )
    lam: float = field(default=0.5, metadata={"help": "λ: weight of z(s_f) in the mutual score", "range": "[0, 1]"})
    top_fraction: float | None = field(
        default=0.5,
        metadata={
            "help": "keep the best ceil(f·n) pairs; None to select by threshold",
            "range": "(0, 1]",
            "hint": "use 1.0 to keep all",
            "excludes": "threshold",
        },
    )
    threshold: float | None = field(
        default=None, metadata={"help": "or keep pairs scoring >= threshold (then top_fraction must be None)"}
    )
    humpback_min_rating: int = field(
        default=4, metadata={"help": "humpback: keep pairs rated >= this (1-5 scale)", "range": "[1, 5]"}
    )
    final_alpha: float = field(
        default=0.5, metadata={"help": "α of the final SFT on seed ∪ selected", "range": "[0, 1]"}
    )
    system_seed: str | None = field(default=None, metadata={"help": "system tag of seed pairs (Humpback's style tag)"})
    system_synthetic: str | None = field(default=None, metadata={"help": "system tag of synthetic pairs"})

    def rules(self) -> list[tuple[str, Any, str]]:
        """(field, value, allowed) for each broken rule between fields."""
        if self.top_fraction is None and self.threshold is None and self.filter_method not in ("humpback", "none"):
            return [("top_fraction", None, f"a fraction in (0, 1], or set threshold ({self.filter_method} selects)")]
        return []

    def validate(self) -> None:
        check(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- 1. the α schedule ---------------------------------------------------------------------------


def alpha_schedule(kind: Schedule, start: float, end: float, rounds: int) -> list[float]:
    """α_k for k = 0..K-1: constant = start; linear and cosine go from start (k=0) to end (k=K-1)."""
    if rounds <= 0:
        return []
    if kind == "constant" or rounds == 1:
        return [start] * rounds
    steps = [k / (rounds - 1) for k in range(rounds)]
    if kind == "linear":
        return [start + (end - start) * t for t in steps]
    if kind == "cosine":  # half a cosine: flat near both ends, steepest in the middle
        return [end + (start - end) * (1 + math.cos(math.pi * t)) / 2 for t in steps]
    raise ValueError(f"unknown alpha schedule {kind!r}")


# ---- 2. one mutual-alignment round ----------------------------------------------------------------


@dataclass
class RoundResult:
    round: int
    alpha: float
    forward: SFTResult
    reverse: SFTResult
    synthetic_instructions: int
    synthetic_responses: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "alpha": self.alpha,
            "forward": self.forward.to_dict(),
            "reverse": self.reverse.to_dict(),
            "synthetic_instructions": self.synthetic_instructions,
            "synthetic_responses": self.synthetic_responses,
        }


def round_update(
    k: int,
    alpha: float,
    bank: ModelBank,
    tokenizer: PreTrainedTokenizerBase,
    seed: Sequence[Pair],
    sft: SFTSettings,
    generation: GenerationSettings,
    out_dir: str | Path,
    main: MainSettings,
) -> RoundResult:
    """Round k, in place on the bank's "forward" and "reverse" adapters (§1 Step 1): the forward update with
    x̂ = p_r(y), then the reverse update with ŷ = p_f(x) written by the forward model just updated."""
    out_dir = Path(out_dir)
    sampling = dataclasses.replace(generation, seed=generation.seed + 1000 * k)
    results, written = {}, {}
    for learner, writer in (("forward", "reverse"), ("reverse", "forward")):
        # the other model writes the side this one learns to predict: instructions for forward, responses for reverse
        with bank.use(writer) as model:  # written by the main process, for all (every process then trains on it)
            write = partial(complete_pairs, model, tokenizer, writer, seed, sampling, main.system_seed)
            generations = distributed.on_main(write)
        synthetic = [
            Pair(g.text, p.response, "round_synthetic")
            if writer == "reverse"
            else Pair(p.instruction, g.text, "round_synthetic")
            for p, g in zip(seed, generations, strict=True)
            if _usable(g)
        ]
        settings = dataclasses.replace(
            sft, direction=learner, system_seed=main.system_seed, system_synthetic=main.system_synthetic
        )
        with bank.train(learner) as model:
            results[learner] = train_sft(
                model, tokenizer, weight_pairs(seed, synthetic, alpha), settings, out_dir / f"{learner}_trainer"
            )
        written[learner] = len(synthetic)
    return RoundResult(k, alpha, results["forward"], results["reverse"], written["forward"], written["reverse"])


def _usable(generation: Generation) -> bool:
    return generation.finish_reason == "eos" and bool(generation.text.strip())


# ---- 3. synthesis -----------------------------------------------------------------------------------


@dataclass
class Synthesis:
    """Synthetic pairs and, for every pool response, what happened to it."""

    pairs: list[Pair]
    rows: list[dict[str, Any]]
    dropped: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": [p.to_dict() for p in self.pairs], "rows": self.rows, "dropped": self.dropped}


def synthesis_row(item: Pair, generation: Generation) -> dict[str, Any]:
    """What happened to one pool response: the instruction written for it, why generation stopped, and whether
    it is unusable ("empty", "truncated": hit max_new_tokens). Duplicates are marked later, over the whole pool."""
    instruction = normalize_text(generation.text)
    reason = "empty" if not instruction else "truncated" if generation.finish_reason == "length" else None
    return {
        "response": item.response,
        "instruction": instruction,
        "finish_reason": generation.finish_reason,
        "source": item.source,
        "dropped": reason,
    }


def mark_duplicates(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The rows again, a usable instruction already written for an earlier response marked "duplicate".

    Only a 16-byte hash per kept instruction is held, so a 500k pool costs 8 MB here, not its text."""
    seen: set[bytes] = set()
    for row in rows:
        if row["dropped"] is None:
            key = re.sub(r"\s+", " ", row["instruction"]).casefold()
            digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                row = {**row, "dropped": "duplicate"}
            seen.add(digest)
        yield row


def synthesis_pair(row: dict[str, Any]) -> Pair:
    """The synthetic pair of a kept synthesis row."""
    return Pair(row["instruction"], row["response"], row["source"] or "synthetic")


def clean_synthesis(pool: Sequence[Pair], generations: Sequence[Generation]) -> Synthesis:
    """Keep an instruction unless it is empty, truncated (hit max_new_tokens) or a duplicate of an earlier one."""
    rows = list(mark_duplicates(synthesis_row(p, g) for p, g in zip(pool, generations, strict=True)))
    dropped = Counter(r["dropped"] for r in rows if r["dropped"])
    pairs = [synthesis_pair(r) for r in rows if not r["dropped"]]
    return Synthesis(pairs, rows, {r: dropped.get(r, 0) for r in SYNTHESIS_DROP_REASONS})


# ---- 4. scores ----------------------------------------------------------------------------------------


@dataclass
class PoolScores:
    """Mean log-likelihoods of each pair: conditional and unconditional, under both models."""

    forward: list[float]  # (1/|y|) Σ log p_f(y_t | x, y_<t)
    reverse: list[float]  # (1/|x|) Σ log p_r(x_t | y, x_<t)
    forward_unconditional: list[float]  # same with an empty instruction
    reverse_unconditional: list[float]  # same with an empty response

    def s_f(self, normalization: Normalization) -> list[float]:
        if normalization == "none":
            return list(self.forward)
        return [a - b for a, b in zip(self.forward, self.forward_unconditional, strict=True)]

    def s_r(self, normalization: Normalization) -> list[float]:
        if normalization == "none":
            return list(self.reverse)
        return [a - b for a, b in zip(self.reverse, self.reverse_unconditional, strict=True)]

    def to_dict(self) -> dict[str, list[float]]:
        return asdict(self)

    def rows(self) -> list[dict[str, float]]:
        """One row of four floats per pair (the score stage's shard rows)."""
        return [dict(zip(SCORE_COLUMNS, values, strict=True)) for values in zip(*self.to_dict().values(), strict=True)]

    @classmethod
    def from_rows(cls, rows: Iterable[dict[str, float]]) -> PoolScores:
        """From per-pair score rows, streamed: only these floats are held, never the texts."""
        columns: dict[str, list[float]] = {name: [] for name in SCORE_COLUMNS}
        for row in rows:
            for name, values in columns.items():
                values.append(row[name])
        return cls(**columns)


SCORE_COLUMNS = ("forward", "reverse", "forward_unconditional", "reverse_unconditional")


def score_pool(
    bank: ModelBank,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    scoring: ScoringSettings | None = None,
    system: str | None = None,
    adapters: tuple[str | None, str | None] = ("forward", "reverse"),
) -> PoolScores:
    """Both models' length-normalised likelihoods of each pair, with and without their condition (§1 Step 3).

    `adapters` names the forward and the reverse model in the bank (None: the plain base)."""
    columns: dict[str, list[float]] = {}
    for direction, name in zip(("forward", "reverse"), adapters, strict=True):
        with bank.use(name) as model:
            found = score_pairs(model, tokenizer, direction, pairs, scoring, system)
            columns[direction] = [s.mean for s in found]
            # Without its condition a pair's score depends on its target alone (the response forward, the
            # instruction in reverse), so each distinct target is scored once: the shuffled half of
            # `ground_truth_auc` repeats every target of the true half.
            target = [p.response if direction == "forward" else p.instruction for p in pairs]
            first: dict[str, Pair] = {}
            for text, pair in zip(target, pairs, strict=True):
                first.setdefault(text, pair)
            distinct = list(first.values())
            found = score_pairs(model, tokenizer, direction, distinct, scoring, system, unconditional=True)
            by_target = dict(zip(first, (s.mean for s in found), strict=True))
            columns[direction + "_unconditional"] = [by_target[text] for text in target]
    return PoolScores(**columns)


def zscore(values: Sequence[float]) -> list[float]:
    """(v − mean) / std over the pool (population std); all zeros when the values are constant."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [0.0] * n if std == 0 else [(v - mean) / std for v in values]


def filter_scores(
    scores: PoolScores, method: FilterMethod, normalization: Normalization, lam: float, seed: int = 0
) -> list[float]:
    """The score each filter ranks by: mutual = λ·z(s_f) + (1−λ)·z(s_r); forward = s_f; reverse = s_r;
    random = `random_scores(n, seed)`, so that `select` keeps a random subset as large as the other filters'."""
    if method == "random":
        return random_scores(len(scores.forward), seed)
    if method == "forward":
        return scores.s_f(normalization)
    if method == "reverse":
        return scores.s_r(normalization)
    if method == "mutual":
        zf, zr = zscore(scores.s_f(normalization)), zscore(scores.s_r(normalization))
        return [lam * a + (1 - lam) * b for a, b in zip(zf, zr, strict=True)]
    raise ValueError(f"filter_scores covers mutual, forward, reverse and random; got {method!r}")


def random_scores(n: int, seed: int) -> list[float]:
    """n uniform draws in [0, 1), the same for the same seed: the chance baseline a filter has to beat.

    The generator is keyed by a string, not by `seed` itself, so its draws are not the stream that sampled the
    pool with the same seed (`data.sample_pairs`)."""
    rng = random.Random(f"random-filter:{seed}")
    return [rng.random() for _ in range(n)]


# ---- 5. selection ---------------------------------------------------------------------------------------


def select(scores: Sequence[float], top_fraction: float | None = None, threshold: float | None = None) -> list[int]:
    """Indices kept, best first: exactly ceil(top_fraction · n) of them, or all with score >= threshold."""
    if (top_fraction is None) == (threshold is None):
        raise ValueError("select needs exactly one of top_fraction and threshold")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_fraction is not None:
        return order[: kept_count(len(scores), top_fraction)]
    return [i for i in order if scores[i] >= threshold]


def kept_count(n: int, top_fraction: float) -> int:
    """How many of n pairs `select` keeps by `top_fraction`: ceil(top_fraction · n)."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1]; got {top_fraction}")
    return math.ceil(top_fraction * n)


# ---- 6. the Humpback baseline: self-curation by a 5-point rating -------------------------------------------

# Our own wording of a 5-point quality rubric in the spirit of Humpback's self-curation prompt.
RATING_PROMPT = """Rate how well the answer below serves as a helpful AI assistant's reply to the instruction.

Instruction:
{instruction}

Answer:
{response}

Use this scale:
1 - The answer is unrelated to the instruction, empty, or unusable.
2 - The answer touches the topic but misses most of what was asked.
3 - The answer is relevant and partly helpful, but incomplete, off in tone, or padded with unrelated text.
4 - The answer addresses the instruction fully and clearly, written as an assistant would.
5 - The answer is excellent: complete, accurate, focused, and well organised.

Reply with "Score: " followed by a single number from 1 to 5."""


def parse_rating(text: str) -> int | None:
    """The 1–5 rating in a model's reply ('Score: 4', 'I would give it 4/5', '4'); None when there is none."""
    match = re.search(r"score\s*[:=]?\s*([1-5])\b", text, flags=re.IGNORECASE)
    if match is None:
        match = re.search(r"(?<![\d.])([1-5])(?:\s*/\s*5)?(?![\d.])", text)
    return int(match.group(1)) if match else None


def humpback_ratings(
    model,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    generation: GenerationSettings,
    system: str | None = None,
) -> list[int | None]:
    """The seed-trained model's 1–5 rating of each pair (None where its reply holds no rating)."""
    prompts = [
        build_prompt(
            tokenizer, "forward", RATING_PROMPT.format(instruction=p.instruction, response=p.response), "", system
        )
        for p in pairs
    ]
    return [parse_rating(g.text) for g in generate(model, tokenizer, prompts, generation, desc="humpback rating")]


# ---- 7. ground truth: true pairs vs shuffled pairs ----------------------------------------------------------


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann–Whitney)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def shuffled_pairs(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """Each response with another pair's instruction (a derangement: no pair keeps its own)."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    while any(i == j for i, j in enumerate(order)):
        rng.shuffle(order)
    return [Pair(pairs[j].instruction, p.response, "shuffled") for p, j in zip(pairs, order, strict=True)]


def ground_truth_auc(
    bank: ModelBank,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    lam: float = 0.5,
    seed: int = 0,
    scoring: ScoringSettings | None = None,
    adapters: tuple[str | None, str | None] = ("forward", "reverse"),
    system: str | None = None,
) -> dict[str, float]:
    """Pooled ROC-AUC of true vs shuffled pairs for forward, reverse and mutual scores, pmi and none."""
    pooled = list(pairs) + shuffled_pairs(pairs, seed)
    scores = score_pool(bank, tokenizer, pooled, scoring, system, adapters)
    n = len(pairs)
    result = {}
    for normalization in ("pmi", "none"):
        for method in ("forward", "reverse", "mutual"):
            values = filter_scores(scores, method, normalization, lam)
            result[f"{method}_{normalization}"] = roc_auc(values[:n], values[n:])
    return result
