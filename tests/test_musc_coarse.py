"""MuSC coarse granularity, model-free parts: the decomposition parser and the corruption plan."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mainlib.data import bundled_path, load_jsonl
from mainlib.musc.coarse import (
    Corruption,
    CorruptionSettings,
    Decomposition,
    apply_corruption,
    corruption_count,
    parse_decomposition,
    plan_corruption,
)


def test_parses_the_prompted_format() -> None:
    text = (
        "Input: Dear team, the meeting moved.\nConstraints:\n1. Rewrite the email.\n2. Use no commas.\n3. End with P.S."
    )
    assert parse_decomposition(text) == Decomposition(
        "Dear team, the meeting moved.", ("Rewrite the email.", "Use no commas.", "End with P.S.")
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("I cannot help with that.", None),
        ("Input: none\nConstraints:\n", None),
        # no numbering, bullets, extra chatter before and after, other numbering styles
        (
            "Sure! Here it is.\nInput: none\nConstraints:\n- Write a poem.\n- Use 4 lines.\n\nHope this helps!",
            Decomposition("", ("Write a poem.", "Use 4 lines.")),
        ),
        (
            "1) Summarise the text\n2) Keep it under 50 words",
            Decomposition("", ("Summarise the text", "Keep it under 50 words")),
        ),
        (
            "input:\nline one\nline two\nconstraints:\n(1) Translate it.\n(2) Be formal.",
            Decomposition("line one\nline two", ("Translate it.", "Be formal.")),
        ),
        ("Input: N/A\nConstraints: 1. Answer briefly.", Decomposition("", ("Answer briefly.",))),
    ],
)
def test_parser_survives_malformed_output(text: str, expected: Decomposition | None) -> None:
    assert parse_decomposition(text) == expected


def test_parser_round_trips_the_bundled_ground_truth() -> None:
    """Each bundled complex instruction, written in the prompted format, parses back to its parts."""
    for row in load_jsonl(bundled_path("complex_instructions.jsonl")):
        constraints = [row["task"], *row["constraints"]]
        text = f"Input: {row['input'] or 'none'}\nConstraints:\n" + "\n".join(
            f"{i + 1}. {c}" for i, c in enumerate(constraints)
        )
        parsed = parse_decomposition(text)
        assert parsed is not None, row["id"]
        assert [c.split() for c in parsed.constraints] == [c.split() for c in constraints], row["id"]
        assert parsed.input.split() == row["input"].split(), row["id"]  # same text; blank lines may go


@pytest.mark.parametrize(
    ("n", "ratio", "k"), [(2, 0.3, 1), (3, 0.3, 1), (5, 0.3, 2), (10, 0.3, 3), (4, 1.0, 3), (6, 0.25, 2)]
)
def test_corruption_count(n: int, ratio: float, k: int) -> None:
    assert corruption_count(n, ratio) == k


def test_plan_never_touches_constraint_zero_and_respects_the_ratio() -> None:
    settings = CorruptionSettings(drop_ratio=0.3)
    kinds: Counter[str] = Counter()
    for seed in range(400):
        n = 2 + seed % 7
        plan = plan_corruption(n, settings, random.Random(seed))
        assert len(plan) == corruption_count(n, 0.3)
        assert all(1 <= c.index < n for c in plan) and len({c.index for c in plan}) == len(plan)
        kinds.update(c.kind for c in plan)
    total = sum(kinds.values())
    assert abs(kinds["drop"] / total - 0.5) < 0.06 and abs(kinds["negate"] / total - 0.25) < 0.06


def test_plan_is_reproducible_with_a_seed() -> None:
    settings = CorruptionSettings(drop_ratio=0.5, p_drop=0.2, p_substitute=0.4, p_negate=0.4)
    assert plan_corruption(8, settings, random.Random(3)) == plan_corruption(8, settings, random.Random(3))
    assert any(
        plan_corruption(8, settings, random.Random(s)) != plan_corruption(8, settings, random.Random(3))
        for s in range(4, 10)
    )


def test_apply_corruption() -> None:
    constraints = ["Write a story.", "Use 3 paragraphs.", "No commas.", "End with a question."]
    plan = [Corruption(1, "drop"), Corruption(2, "negate"), Corruption(3, "substitute")]
    rewrites = {2: "Use commas often.", 3: "End with an exclamation."}
    assert apply_corruption(constraints, plan, rewrites) == [
        "Write a story.",
        "Use commas often.",
        "End with an exclamation.",
    ]
    with pytest.raises(ValueError, match="constraint 2 is to be negated but no rewrite"):
        apply_corruption(constraints, plan, {3: "x"})


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="must be 1"):
        plan_corruption(4, CorruptionSettings(p_drop=0.5, p_substitute=0.5, p_negate=0.5), random.Random(0))
    with pytest.raises(ValueError, match=r"parameter drop_ratio: got 0\.0; allowed: \(0, 1\]"):
        plan_corruption(4, CorruptionSettings(drop_ratio=0.0), random.Random(0))
    with pytest.raises(ValueError, match="at least 2 constraints"):
        plan_corruption(1, CorruptionSettings(), random.Random(0))
