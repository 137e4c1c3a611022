"""Coarse granularity of MuSC: constraint-aware preference pairs (ALGORITHMS.md §2, steps 1–5).

    (self_instruct) -> decompose -> contrast (corrupt + recombine) -> respond

The policy model does every writing step through one `Complete` function (prompts in, generations out;
`writer(model, tokenizer)` makes it from the shared generation engine), so the steps can be tested with
scripted outputs. The model-free parts are `parse_decomposition` (reads the model's decomposition) and
`plan_corruption` / `apply_corruption` (which constraints to corrupt, and how). Every step returns its
records and counts of what it dropped and why.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from mainlib.generate import Generation, GenerationSettings, generate
from mainlib.musc import prompts
from mainlib.parameters import check
from mainlib.prompts import build_prompt

CorruptionKind = Literal["drop", "substitute", "negate"]

# A numbered or bulleted list item: "1. x", "2) x", "(3) x", "- x", "* x", "• x".
_ITEM = re.compile(r"^\s*(?:\(?\d{1,2}[.):]\)?|[-*•])\s+(.*\S)\s*$")
_INPUT = re.compile(r"^\s*(?:task\s+)?input\s*:\s*(.*)$", re.IGNORECASE)
_CONSTRAINTS_HEADER = re.compile(
    r"^\s*constraints?\s*(?::\s*(.*))?$", re.IGNORECASE
)  # "Constraints" or "Constraints: ..."


@dataclass(frozen=True)
class Decomposition:
    """An instruction split into its input (the material to work on, may be empty) and atomic constraints.

    By convention constraint 0 is the core task ("Rewrite the text ..."); corruption never touches it.
    """

    input: str
    constraints: tuple[str, ...]


def parse_decomposition(text: str) -> Decomposition | None:
    """Read a decomposition written as:

        Input: <the material, or 'none'>
        Constraints:
        1. <core task>
        2. <constraint>

    The list starts after the last `Constraints:` header (the input itself may contain one), or at the
    first list item when there is no header. Tolerated: chatter before and after, other numbering styles,
    bullets, a missing `Input:` line, an input over several lines, items wrapped over several lines.
    Returns None when no constraint can be found.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    headers = [i for i, line in enumerate(lines) if _CONSTRAINTS_HEADER.match(line)]
    first_item = next((i for i, line in enumerate(lines) if _ITEM.match(line)), len(lines))
    split = headers[-1] if headers else first_item
    head, tail = lines[:split], lines[split:]
    if headers:  # the header line may carry the first item: "Constraints: 1. Answer briefly."
        tail[0] = _CONSTRAINTS_HEADER.match(tail[0]).group(1) or ""

    task_input = ""
    starts = [i for i, line in enumerate(head) if _INPUT.match(line)]
    if starts:
        first = _INPUT.match(head[starts[0]]).group(1)
        task_input = "\n".join(x.strip() for x in [first, *head[starts[0] + 1 :]] if x.strip())
    if task_input.lower().rstrip(".") in ("none", "no", "n/a", "no input", "-"):
        task_input = ""

    constraints: list[str] = []
    for line in tail:
        if item := _ITEM.match(line):
            constraints.append(item.group(1).strip())
        elif not line.strip():
            if constraints:
                break  # a blank line ends the list; what follows is chatter
        elif constraints:
            constraints[-1] = f"{constraints[-1]} {line.strip()}"  # a wrapped line continues the item
    unique: dict[str, str] = {}  # small models repeat items; an atomic list has each constraint once
    for c in constraints:
        unique.setdefault(c.rstrip(".").lower(), c)
    constraints = list(unique.values())
    return Decomposition(task_input, tuple(constraints)) if constraints else None


@dataclass
class CorruptionSettings:
    """How a negative instruction is made: which share of constraints to corrupt, and how."""

    drop_ratio: float = field(
        default=0.3, metadata={"help": "share of constraints to corrupt (at least one)", "range": "(0, 1]"}
    )
    p_drop: float = field(
        default=0.5, metadata={"help": "probability a picked constraint is dropped", "range": "[0, 1]"}
    )
    p_substitute: float = field(
        default=0.25, metadata={"help": "... replaced by a deviating constraint", "range": "[0, 1]"}
    )
    p_negate: float = field(default=0.25, metadata={"help": "... negated", "range": "[0, 1]"})

    def rules(self) -> list[tuple[str, Any, str]]:
        """(field, value, allowed) for each broken rule between fields."""
        probabilities = (self.p_drop, self.p_substitute, self.p_negate)
        if not math.isclose(sum(probabilities), 1.0):
            return [("p_drop", probabilities, "p_drop + p_substitute + p_negate must be 1")]
        return []

    def validate(self) -> None:
        check(self)


@dataclass(frozen=True)
class Corruption:
    index: int
    kind: CorruptionKind

    def to_dict(self) -> dict:
        return asdict(self)


def corruption_count(n_constraints: int, drop_ratio: float) -> int:
    """round(drop_ratio · n) (halves round up), at least 1, and at most n − 1 (constraint 0 stays)."""
    return min(n_constraints - 1, max(1, math.floor(drop_ratio * n_constraints + 0.5)))


def plan_corruption(n_constraints: int, settings: CorruptionSettings, rng: random.Random) -> list[Corruption]:
    """Pick the constraints to corrupt (never index 0) and a kind for each, in index order."""
    settings.validate()
    if n_constraints < 2:
        raise ValueError(f"need at least 2 constraints to corrupt one and keep the core task; got {n_constraints}")
    picked = sorted(rng.sample(range(1, n_constraints), corruption_count(n_constraints, settings.drop_ratio)))
    kinds: tuple[CorruptionKind, ...] = ("drop", "substitute", "negate")
    weights = (settings.p_drop, settings.p_substitute, settings.p_negate)
    return [Corruption(i, rng.choices(kinds, weights)[0]) for i in picked]


def apply_corruption(constraints: Sequence[str], plan: Sequence[Corruption], rewrites: Mapping[int, str]) -> list[str]:
    """The corrupted constraint list: dropped ones removed, substituted/negated ones replaced by `rewrites[i]`."""
    out = []
    by_index = {c.index: c for c in plan}
    for i, constraint in enumerate(constraints):
        corruption = by_index.get(i)
        if corruption is None:
            out.append(constraint)
        elif corruption.kind != "drop":
            if i not in rewrites or not rewrites[i].strip():
                raise ValueError(f"constraint {i} is to be {corruption.kind}d but no rewrite was given")
            out.append(rewrites[i].strip())
    return out


# --------------------------------------------------------------------------------------------------
# The model-driven steps
# --------------------------------------------------------------------------------------------------

Complete = Callable[[Sequence[str], GenerationSettings, str], list[Generation]]  # (prompts, settings, desc)


def writer(model, tokenizer: PreTrainedTokenizerBase) -> Complete:
    """The policy as a `Complete` function, through the shared batched generation engine."""

    def complete(texts: Sequence[str], settings: GenerationSettings, desc: str) -> list[Generation]:
        return generate(model, tokenizer, texts, settings, desc=desc)

    return complete


@dataclass
class CoarseSettings:
    """How the contrastive pairs are made. Defaults follow ALGORITHMS.md §2."""

    decompose: Literal["model", "given"] = field(
        default="model", metadata={"help": "model: the policy decomposes; given: use the source's own constraints"}
    )
    recombine: Literal["model", "template"] = field(
        default="model", metadata={"help": "model: the policy rewrites; template: a fixed layout (an ablation)"}
    )
    min_constraints: int = field(
        default=2,
        metadata={
            "help": "drop instructions with fewer constraints (one to keep, one to corrupt)",
            "range": "[2, inf)",
        },
    )
    corruption: CorruptionSettings = field(
        default_factory=CorruptionSettings,
        metadata={"help": "which constraints are corrupted, and how", "prefix": ""},
    )
    helper: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=160, temperature=0.1, top_p=0.9),
        metadata={"help": "decompose / rewrite / recombine sampling (low temperature)"},
    )
    respond: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=256, temperature=0.5, top_p=0.9),
        metadata={"help": "y_w and y_l sampling", "prefix": "response_"},
    )
    self_instruct: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=128, temperature=1.0, top_p=0.95),
        metadata={"help": "self-generated instructions (diverse)"},
    )
    drop_unfinished: bool = field(
        default=True, metadata={"help": "drop a pair whose y_w or y_l hit max_new_tokens (no EOS)"}
    )
    seed: int = field(default=0, metadata={"help": "corruption plans: each instruction's is seeded by (seed, id)"})

    def validate(self) -> None:
        check(self)


def _tally(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1


def _one_line(text: str) -> str:
    """A rewrite is one constraint: its first non-empty line, without a list marker."""
    for line in text.splitlines():
        if line.strip():
            item = _ITEM.match(line)
            return (item.group(1) if item else line).strip()
    return ""


def self_instruct(
    n: int, tokenizer: PreTrainedTokenizerBase, complete: Complete, settings: CoarseSettings, min_constraints: int = 5
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """n sampled "task with more than `min_constraints` constraints" instructions, deduplicated."""
    texts = [prompts.self_instruct_prompt(tokenizer, min_constraints)] * n
    counts = {"sampled": n}
    seen: set[str] = set()
    records = []
    for g in complete(texts, settings.self_instruct, "self-instruct"):
        text = g.text.strip()
        if not text:
            _tally(counts, "empty")
        elif g.finish_reason == "length":
            _tally(counts, "unfinished")
        elif text in seen:
            _tally(counts, "duplicate")
        else:
            seen.add(text)
            records.append({"id": f"self_{len(records):04d}", "instruction": text})
    counts["kept"] = len(records)
    return records, counts


def given_decomposition(record: Mapping[str, Any]) -> Decomposition | None:
    """A source's own decomposition: `constraints` (core task first), or `task` + `constraints`."""
    constraints = [str(c).strip() for c in record.get("constraints") or [] if str(c).strip()]
    if record.get("task"):
        constraints = [str(record["task"]).strip(), *constraints]
    return Decomposition(str(record.get("input") or "").strip(), tuple(constraints)) if constraints else None


def decompose(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    complete: Complete,
    settings: CoarseSettings,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Step 1: input + constraints for each instruction; unparseable or < min_constraints ones are dropped."""
    counts = {"instructions": len(records)}
    if settings.decompose == "given":
        parsed = [given_decomposition(r) for r in records]
        raw = [""] * len(records)
    else:
        texts = [prompts.decompose_prompt(tokenizer, r["instruction"]) for r in records]
        raw = [g.text for g in complete(texts, settings.helper, "decompose")]
        parsed = [parse_decomposition(t) for t in raw]
    out = []
    for record, decomposition, text in zip(records, parsed, raw, strict=True):
        if decomposition is None:
            _tally(counts, "unparseable")
        elif len(decomposition.constraints) < settings.min_constraints:
            _tally(counts, "too_few_constraints")
        elif prompts.copies_demo(decomposition.input + " ".join(decomposition.constraints), record["instruction"]):
            _tally(counts, "copied_demo")
        else:
            out.append(
                {
                    "id": record["id"],
                    "instruction": record["instruction"],
                    "input": decomposition.input,
                    "constraints": list(decomposition.constraints),
                    "raw": text,
                }
            )
    counts["kept"] = len(out)
    return out, counts


def _rewrite_constraints(
    decompositions: Sequence[Mapping[str, Any]],
    plans: Sequence[list[Corruption]],
    tokenizer: PreTrainedTokenizerBase,
    complete: Complete,
    helper: GenerationSettings,
) -> list[dict[int, str]]:
    """The model's substitutions and negations, by decomposition and constraint index; an empty or unchanged
    rewrite is left out (the caller turns it into a drop)."""
    wanted = [(k, c) for k, plan in enumerate(plans) for c in plan if c.kind != "drop"]
    texts = [prompts.rewrite_prompt(tokenizer, c.kind, decompositions[k]["constraints"][c.index]) for k, c in wanted]
    written = complete(texts, helper, "rewrite constraints") if texts else []
    rewrites: list[dict[int, str]] = [{} for _ in decompositions]
    for (k, c), g in zip(wanted, written, strict=True):
        new = _one_line(g.text)
        original = decompositions[k]["constraints"][c.index]
        if new and new.rstrip(".").lower() != original.rstrip(".").lower():
            rewrites[k][c.index] = new
    return rewrites


def _fall_back_to_drop(plans: list[list[Corruption]], rewrites: list[dict[int, str]], counts: dict[str, int]) -> None:
    """A substitution or negation without a usable rewrite becomes a drop, so every plan can be applied."""
    for plan, written in zip(plans, rewrites, strict=True):
        for i, c in enumerate(plan):
            if c.kind != "drop" and c.index not in written:
                plan[i] = Corruption(c.index, "drop")
                _tally(counts, "rewrite_fallback")


def _recombine(
    decompositions: Sequence[Mapping[str, Any]],
    corrupted: Sequence[list[str]],
    tokenizer: PreTrainedTokenizerBase,
    complete: Complete,
    settings: CoarseSettings,
) -> list[tuple[str, str, bool]]:
    """(x, x′, both finished) per decomposition: the clean and the corrupted list, written as instructions."""
    pairs = list(zip(decompositions, corrupted, strict=True))
    if settings.recombine == "template":
        return [
            (prompts.recombine_template(d["input"], d["constraints"]), prompts.recombine_template(d["input"], c), True)
            for d, c in pairs
        ]
    texts = [prompts.recombine_prompt(tokenizer, d["input"], d["constraints"]) for d in decompositions]
    texts += [prompts.recombine_prompt(tokenizer, d["input"], c) for d, c in pairs]
    written = complete(texts, settings.helper, "recombine")
    clean, noised = written[: len(decompositions)], written[len(decompositions) :]
    return [
        (x.text.strip(), x_prime.text.strip(), x.finish_reason == "eos" and x_prime.finish_reason == "eos")
        for x, x_prime in zip(clean, noised, strict=True)
    ]


def _contrast_problem(decomposition: Mapping[str, Any], x: str, x_prime: str, finished: bool) -> str | None:
    """Why a recombined pair (x, x′) is unusable, or None."""
    if not x or not x_prime:
        return "recombine_empty"
    if not finished:
        return "recombine_unfinished"
    if x == x_prime:
        return "recombine_identical"
    if prompts.copies_demo(x + x_prime, decomposition["input"] + " ".join(decomposition["constraints"])):
        return "copied_demo"
    return None


def _contrast_row(
    decomposition: Mapping[str, Any],
    plan: Sequence[Corruption],
    rewrites: Mapping[int, str],
    corrupted: list[str],
    instructions: tuple[str, str],
) -> dict[str, Any]:
    """The contrast record: the decomposition, what was corrupted and how, and the two instructions x and x′."""
    d = decomposition
    corruption = [
        {**c.to_dict(), "original": d["constraints"][c.index], "rewrite": rewrites.get(c.index)} for c in plan
    ]
    return {
        **{key: d[key] for key in ("id", "instruction", "input", "constraints")},
        "corrupted_constraints": corrupted,
        "corruption": corruption,
        "prompt": instructions[0],
        "noised_prompt": instructions[1],
    }


def contrast(
    decompositions: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    complete: Complete,
    settings: CoarseSettings,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Steps 2–3: corrupt each constraint list, then recombine the clean one into x and the corrupted one into x′.

    The plan of each instruction is seeded by (seed, id), so it does not depend on the other instructions.
    A substitution or negation the model leaves empty or unchanged becomes a drop (counted `rewrite_fallback`).
    """
    settings.corruption.validate()
    counts: dict[str, int] = {"decompositions": len(decompositions)}
    plans = [
        plan_corruption(len(d["constraints"]), settings.corruption, random.Random(f"{settings.seed}:{d['id']}"))
        for d in decompositions
    ]
    rewrites = _rewrite_constraints(decompositions, plans, tokenizer, complete, settings.helper)
    _fall_back_to_drop(plans, rewrites, counts)
    corrupted = [
        apply_corruption(d["constraints"], p, r) for d, p, r in zip(decompositions, plans, rewrites, strict=True)
    ]
    recombined = _recombine(decompositions, corrupted, tokenizer, complete, settings)
    out = []
    for d, plan, written, noised, (x, x_prime, finished) in zip(
        decompositions, plans, rewrites, corrupted, recombined, strict=True
    ):
        if reason := _contrast_problem(d, x, x_prime, finished):
            _tally(counts, reason)
        else:
            out.append(_contrast_row(d, plan, written, noised, (x, x_prime)))
    counts["kept"] = len(out)
    return out, counts


def respond(
    contrasts: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    complete: Complete,
    settings: CoarseSettings,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Step 4: y_w ~ π(·|x), y_l ~ π(·|x′); the preference row is (x, y_w ≻ y_l)."""
    counts: dict[str, int] = {"contrasts": len(contrasts)}
    if not contrasts:
        return [], {**counts, "kept": 0}
    texts = [build_prompt(tokenizer, "forward", c["prompt"]) for c in contrasts]
    texts += [build_prompt(tokenizer, "forward", c["noised_prompt"]) for c in contrasts]
    written = complete(texts, settings.respond, "respond")
    n = len(contrasts)
    out = []
    for k, c in enumerate(contrasts):
        chosen, rejected = written[k], written[n + k]
        if not chosen.text or not rejected.text:
            _tally(counts, "empty_response")
        elif settings.drop_unfinished and "length" in (chosen.finish_reason, rejected.finish_reason):
            _tally(counts, "unfinished_response")
        elif chosen.text == rejected.text:
            _tally(counts, "identical_responses")
        else:
            out.append(
                {
                    "id": c["id"],
                    "prompt": c["prompt"],
                    "chosen": chosen.text,
                    "rejected": rejected.text,
                    "noised_prompt": c["noised_prompt"],
                    "constraints": c["constraints"],
                    "corruption": c["corruption"],
                    "input": c["input"],
                    "instruction": c["instruction"],
                }
            )
    counts["kept"] = len(out)
    return out, counts
