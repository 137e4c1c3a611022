"""Coarse granularity of MuSC: constraint-aware preference pairs (ALGORITHMS.md §2, steps 1–4).

This module holds the parts that do not need a model: reading the model's decomposition of an
instruction (`parse_decomposition`), and choosing which constraints to corrupt and how
(`plan_corruption`, `apply_corruption`). The model writes the decomposition, and the substitutions and
negations the plan asks for.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

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
    if task_input.lower().rstrip(".") in ("none", "n/a", "no input", "-"):
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
    constraints = [c for c in constraints if c]
    return Decomposition(task_input, tuple(constraints)) if constraints else None


@dataclass
class CorruptionSettings:
    """How a negative instruction is made: which share of constraints to corrupt, and how."""

    drop_ratio: float = field(default=0.3, metadata={"help": "share of constraints to corrupt (at least one)"})
    p_drop: float = field(default=0.5, metadata={"help": "probability a picked constraint is dropped"})
    p_substitute: float = field(default=0.25, metadata={"help": "... replaced by a deviating constraint"})
    p_negate: float = field(default=0.25, metadata={"help": "... negated"})

    def validate(self) -> None:
        if not 0.0 < self.drop_ratio <= 1.0:
            raise ValueError(f"drop_ratio must be in (0, 1]; got {self.drop_ratio}")
        probabilities = (self.p_drop, self.p_substitute, self.p_negate)
        if min(probabilities) < 0 or not math.isclose(sum(probabilities), 1.0):
            raise ValueError(f"p_drop + p_substitute + p_negate must be 1 with none negative; got {probabilities}")


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
