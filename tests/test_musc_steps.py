"""MuSC coarse steps with a scripted policy: what each step keeps, drops (and why) and writes."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from mainlib.data import DataError
from mainlib.generate import Generation, GenerationSettings
from mainlib.musc.coarse import CoarseSettings, CorruptionSettings, contrast, decompose, respond, self_instruct
from mainlib.musc.pipeline import load_instructions


class Script:
    """A fake policy: the first rule whose key occurs in the prompt's last user turn answers it."""

    def __init__(self, tokenizer, rules: Sequence[tuple[str, str | Generation]]) -> None:
        self.tokenizer, self.rules, self.calls = tokenizer, rules, []

    def __call__(self, prompts: Sequence[str], settings: GenerationSettings, desc: str) -> list[Generation]:
        self.calls.append((desc, len(prompts), settings.temperature))
        out = []
        for prompt in prompts:
            last_turn = prompt.rsplit("<|im_start|>user", 1)[-1]
            answer = next((a for key, a in self.rules if key in last_turn), "")
            out.append(answer if isinstance(answer, Generation) else Generation(answer, "eos", 5))
        return out


INSTRUCTIONS = [
    {"id": "a", "instruction": "Describe a cat. Use three sentences. Do not use commas. End with a question."},
    {"id": "b", "instruction": "Say hi."},
    {"id": "c", "instruction": "Write something."},
]
DECOMPOSITION_A = (
    "Sure! Here it is.\nInput: none\nConstraints:\n1. Describe a cat.\n2. Use three sentences.\n"
    "3. Do not use commas.\n4. End with a question.\n\nHope this helps!"
)


def test_decompose_counts_what_it_drops(tiny_tokenizer) -> None:
    script = Script(tiny_tokenizer, [("Describe a cat", DECOMPOSITION_A), ("Say hi", "Constraints:\n1. Say hi.")])
    rows, counts = decompose(INSTRUCTIONS, tiny_tokenizer, script, CoarseSettings())
    assert counts == {"instructions": 3, "unparseable": 1, "too_few_constraints": 1, "kept": 1}
    assert rows[0]["constraints"] == [
        "Describe a cat.",
        "Use three sentences.",
        "Do not use commas.",
        "End with a question.",
    ]
    assert rows[0]["input"] == "" and rows[0]["id"] == "a"
    assert script.calls == [("decompose", 3, 0.1)]  # one batch, low temperature


def test_given_decomposition_needs_no_model(tiny_tokenizer) -> None:
    record = {"id": "g", "instruction": "x", "task": "Summarize.", "input": "Some text.", "constraints": ["Be short."]}
    rows, counts = decompose([record], tiny_tokenizer, Script(tiny_tokenizer, []), CoarseSettings(decompose="given"))
    assert counts["kept"] == 1 and rows[0]["constraints"] == ["Summarize.", "Be short."]
    assert rows[0]["input"] == "Some text."


DECOMPOSED = [
    {
        "id": f"d{k}",
        "instruction": "orig",
        "input": "",
        "constraints": ["Describe a cat.", "Use three sentences.", "Do not use commas.", "End with a question."],
    }
    for k in range(12)
]


def test_contrast_rewrites_recombines_and_falls_back_to_drop(tiny_tokenizer) -> None:
    settings = CoarseSettings(corruption=CorruptionSettings(drop_ratio=0.5, p_drop=0.0, p_substitute=0.5, p_negate=0.5))
    script = Script(
        tiny_tokenizer,
        [
            ("Replace this constraint", "1. Use ten sentences."),  # a list marker is stripped
            ("opposite of this constraint", ""),  # the model fails to negate: the constraint is dropped instead
            ("Combine the input", "RECOMBINED"),
        ],
    )
    rows, counts = contrast(DECOMPOSED, tiny_tokenizer, script, settings)
    # The fake recombination writes the same text for x and x′, so every pair is dropped as identical ...
    assert counts["recombine_identical"] == 12 and counts["kept"] == 0
    negations = sum(c for desc, c, _ in script.calls if desc == "rewrite constraints")
    assert negations == 24  # round(0.5·4) = 2 corruptions each, none of them a drop
    assert counts["rewrite_fallback"] > 0

    # ... and with a recombination that echoes its constraints, they are kept with the corrupted list.
    def echo(prompts, gen, desc):
        script.calls.append((desc, len(prompts), gen.temperature))
        if desc != "recombine":
            return script(prompts, gen, desc)
        return [Generation(p.rsplit("Constraints:\n", 1)[-1].split("<|im_end|>")[0], "eos", 3) for p in prompts]

    rows, counts = contrast(DECOMPOSED, tiny_tokenizer, echo, settings)
    assert counts["kept"] == 12
    for row in rows:
        assert row["corrupted_constraints"][0] == "Describe a cat."  # the core task is never touched
        kinds = {c["kind"] for c in row["corruption"]}
        assert kinds <= {"substitute", "drop"}  # failed negations became drops
        for c in row["corruption"]:
            assert c["index"] > 0 and c["original"] == row["constraints"][c["index"]]
            assert (c["rewrite"] == "Use ten sentences.") == (c["kind"] == "substitute")
        assert "Use ten sentences." in row["noised_prompt"] or len(row["corrupted_constraints"]) < 4
        assert row["prompt"] != row["noised_prompt"]


def test_contrast_is_reproducible_and_per_instruction(tiny_tokenizer) -> None:
    settings = CoarseSettings(recombine="template")
    script = Script(tiny_tokenizer, [("Replace", "Use five sentences."), ("opposite", "Use commas.")])
    first, _ = contrast(DECOMPOSED, tiny_tokenizer, script, settings)
    again, _ = contrast(DECOMPOSED[::-1], tiny_tokenizer, script, settings)
    assert first == again[::-1]  # each plan is seeded by (seed, id), not by the position in the batch
    other, _ = contrast(DECOMPOSED, tiny_tokenizer, script, CoarseSettings(recombine="template", seed=1))
    assert [r["corruption"] for r in other] != [r["corruption"] for r in first]


def test_respond_writes_the_preference_rows(tiny_tokenizer) -> None:
    contrasts = [
        {"id": "p", "prompt": "CLEAN one", "noised_prompt": "NOISY one", "constraints": ["c0", "c1"], "corruption": []},
        {"id": "q", "prompt": "CLEAN two", "noised_prompt": "NOISY two", "constraints": ["c0", "c1"], "corruption": []},
        {"id": "r", "prompt": "CLEAN same", "noised_prompt": "NOISY same", "constraints": ["c0"], "corruption": []},
    ]
    for c in contrasts:
        c.update(input="", instruction="orig")
    script = Script(
        tiny_tokenizer,
        [
            ("CLEAN one", "good"),
            ("NOISY one", "bad"),
            ("CLEAN two", "fine"),
            ("NOISY two", Generation("cut off", "length", 9)),
            ("same", "identical"),
        ],
    )
    rows, counts = respond(contrasts, tiny_tokenizer, script, CoarseSettings())
    assert counts == {"contrasts": 3, "unfinished_response": 1, "identical_responses": 1, "kept": 1}
    assert {k: rows[0][k] for k in ("prompt", "chosen", "rejected", "noised_prompt")} == {
        "prompt": "CLEAN one",
        "chosen": "good",
        "rejected": "bad",
        "noised_prompt": "NOISY one",
    }
    assert {"constraints", "corruption"} <= set(rows[0])
    rows, counts = respond(contrasts, tiny_tokenizer, script, CoarseSettings(drop_unfinished=False))
    assert counts["kept"] == 2


def test_self_instruct_deduplicates(tiny_tokenizer) -> None:
    outputs = iter(["Task one. Be brief.", "Task one. Be brief.", "", "Task two. Use lists."])

    def complete(prompts, gen, desc):
        assert "more than 5 constraints" in prompts[0]
        return [Generation(next(outputs), "eos", 4) for _ in prompts]

    rows, counts = self_instruct(4, tiny_tokenizer, complete, CoarseSettings())
    assert [r["instruction"] for r in rows] == ["Task one. Be brief.", "Task two. Use lists."]
    assert counts == {"sampled": 4, "duplicate": 1, "empty": 1, "kept": 2}


def test_instruction_files_are_checked(tmp_path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"instruction": "Do X. Use Y."}) + "\n\n" + json.dumps({"instruction": "Z", "id": 7}) + "\n"
    )
    assert [r["id"] for r in load_instructions(str(good))] == ["line_1", "7"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "ok"}) + "\n" + json.dumps({"prompt": "no"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'instruction'"):
        load_instructions(str(bad))
    assert len(load_instructions("bundled:complex_instructions")) == 100


def test_answers_copied_from_the_demos_are_dropped(tiny_tokenizer) -> None:
    from mainlib.musc.prompts import DEMO_MATERIAL

    leaked = f"Input: {DEMO_MATERIAL[0]}\nConstraints:\n1. Summarize the paragraph.\n2. Use two sentences."
    script = Script(tiny_tokenizer, [("Describe a cat", leaked), ("Say hi", DECOMPOSITION_A)])
    rows, counts = decompose(INSTRUCTIONS[:2], tiny_tokenizer, script, CoarseSettings())
    assert counts == {"instructions": 2, "copied_demo": 1, "kept": 1} and rows[0]["id"] == "b"
    # the same text is fine when the instruction itself contains it
    own = [{"id": "z", "instruction": f"Summarize this in two sentences.\n\n{DEMO_MATERIAL[0]}"}]
    _, counts = decompose(own, tiny_tokenizer, Script(tiny_tokenizer, [("Summarize", leaked)]), CoarseSettings())
    assert counts["kept"] == 1
