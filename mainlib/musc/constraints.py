"""The constraint bank of the complex instructions MuSC trains on: the bundled set
(`scripts/build_bundled_data.py`) and the reference study's larger one (`study_instructions`) are Self-Instruct
tasks with constraints drawn from it. Written for this project (no external text); none of it is from IFEval,
which only evaluates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from mainlib.paths import data_dir
from mainlib.results import write_jsonl

# Constraint bank for the complex instructions, written for this project (no external text). One
# constraint at most per category, so no two constraints contradict each other.
CONSTRAINTS: dict[str, list[str]] = {
    "length": [
        "Keep the answer under {n} words.",
        "Write at least {m} sentences.",
        "Answer in exactly {k} paragraphs separated by the markdown divider ***.",
    ],
    "format": [
        "Format the answer as exactly {k} markdown bullet points.",
        "Give the answer a title wrapped in double angular brackets, such as <<title>>.",
        "Highlight at least {k} parts of the answer with markdown, i.e. *highlighted part*.",
        "Wrap the entire answer in double quotation marks.",
    ],
    "case": [
        "Write the whole answer in lowercase letters, with no capital letters at all.",
        "Write the whole answer in English capital letters.",
    ],
    "punctuation": ["Do not use any commas.", "Do not use any exclamation marks."],
    "start": ["Start the answer with the word '{word}'.", "Begin with a one-sentence summary of the task."],
    "end": [
        "End the answer with the exact phrase 'Is there anything else I can help with?'",
        "Add a postscript at the end that starts with P.S.",
        "Finish with a sentence that starts with 'In short,'.",
    ],
    "keywords": [
        "Include the keywords '{kw1}' and '{kw2}'.",
        "Do not use the words '{kw1}' or '{kw2}'.",
        "Mention the word '{kw1}' at least twice.",
    ],
    "tone": [
        "Use a formal tone suitable for a business report.",
        "Write it for a ten-year-old reader.",
        "Sound enthusiastic and friendly.",
    ],
}
KEYWORDS = ["simple", "important", "example", "clear", "practical", "future", "quality", "balance", "idea", "time"]
START_WORDS = ["Certainly", "Well", "Here", "Today", "First"]


def complex_instruction(task: dict[str, Any], rng: random.Random, source: str) -> dict[str, Any]:
    """A Self-Instruct task (its first instance's input) with 2-4 constraints of different categories appended."""
    n_constraints = rng.choice([2, 3, 3, 4])
    categories = rng.sample(sorted(CONSTRAINTS), n_constraints)
    kw1, kw2 = rng.sample(KEYWORDS, 2)
    fill = {
        "n": rng.choice([50, 80, 120]),
        "m": rng.choice([3, 4, 5]),
        "k": rng.choice([2, 3, 4]),
        "word": rng.choice(START_WORDS),
        "kw1": kw1,
        "kw2": kw2,
    }
    constraints = [rng.choice(CONSTRAINTS[c]).format(**fill) for c in categories]
    instance = task["instances"][0]
    base = task["instruction"].strip()
    task_input = instance["input"].strip()
    text = base + (f"\n\n{task_input}" if task_input else "") + "\n\n" + " ".join(constraints)
    return {
        "instruction": text,
        "task": base,
        "input": task_input,
        "constraints": constraints,
        "constraint_categories": categories,
        "source": f"{source}:{task['id']}",
    }


SELF_INSTRUCT_FILES = {
    "self_instruct_seed": "self_instruct_seed_tasks.jsonl",
    "self_instruct_user_oriented": "self_instruct_user_oriented_instructions.jsonl",
}


def study_instructions(out: str | Path, seed: int = 0) -> Path:
    """Every Self-Instruct task in `$MAINLIB_DATA_DIR` (175 seed + 252 user-oriented) with its own constraint
    draw, as a complex-instruction file (`MuscConfig.instructions`); the same file for the same seed."""
    rng = random.Random(f"study-instructions:{seed}")
    rows = []
    for source, name in SELF_INSTRUCT_FILES.items():
        path = data_dir() / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: $MAINLIB_DATA_DIR must hold {name}")
        with path.open(encoding="utf-8") as f:
            rows += [complex_instruction(json.loads(line), rng, source) for line in f if line.strip()]
    return write_jsonl(out, ({**row, "id": f"study_{i:03d}"} for i, row in enumerate(rows)))
