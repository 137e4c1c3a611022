"""The prompts the policy answers to build MuSC's contrastive pairs, each with its few-shot demos.

The demos are ours (written for this project, not taken from any benchmark) and are shown to the model as
earlier chat turns (`prompts.build_few_shot_prompt`). Every task asks for a bare answer in a fixed shape
so small models can imitate it; `coarse.parse_decomposition` reads the decomposition shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from mainlib.prompts import build_few_shot_prompt

_CITY = (
    "The city council met on Tuesday to discuss the new park. Mayor Lee said the park would open next spring, "
    "and residents asked for more benches and a playground."
)

# -- decompose: instruction -> input + numbered atomic constraints (constraint 1 = the core task)
DECOMPOSE = (
    "Split the instruction below into its input (the text it works on, or 'none') and a numbered list of "
    "atomic constraints. Constraint 1 is the core task.\n\nInstruction:\n{instruction}"
)
DECOMPOSE_DEMOS = (
    (
        "Summarize the following paragraph in two sentences. Use simple words and do not mention any names.\n\n"
        + _CITY,
        f"Input: {_CITY}\nConstraints:\n1. Summarize the paragraph.\n2. Use exactly two sentences.\n"
        "3. Use simple words.\n4. Do not mention any names.",
    ),
    (
        "Write a short poem about autumn leaves. It should have four lines, every line must start with a capital "
        "letter, and end the poem with a question.",
        "Input: none\nConstraints:\n1. Write a short poem about autumn leaves.\n2. The poem has exactly four lines.\n"
        "3. Every line starts with a capital letter.\n4. End the poem with a question.",
    ),
)

# -- substitute: a constraint -> a different constraint of the same kind that deviates from it
SUBSTITUTE = (
    "Replace this constraint with a different constraint of the same kind that asks for something else. "
    "Reply with the new constraint only.\n\nConstraint: {constraint}"
)
SUBSTITUTE_DEMOS = (
    ("Use exactly two sentences.", "Use at least six sentences."),
    ("Include the keyword 'ocean'.", "Include the keyword 'desert'."),
    ("Write the answer in a formal tone.", "Write the answer in a playful, casual tone."),
)

# -- negate: a constraint -> its opposite
NEGATE = "Write the opposite of this constraint. Reply with the negated constraint only.\n\nConstraint: {constraint}"
NEGATE_DEMOS = (
    ("Do not use any commas.", "Use several commas."),
    ("End the poem with a question.", "Do not end the poem with a question."),
    ("Use simple words.", "Use complex, technical words."),
)

# -- recombine: input + constraints -> one natural instruction (the same demos for x and x′)
RECOMBINE = (
    "Combine the input and the constraints below into one natural instruction that keeps every constraint "
    "and adds none. Reply with the instruction only.\n\n{body}"
)
RECOMBINE_DEMOS = (
    (
        "Input: none\nConstraints:\n1. Write a short poem about autumn leaves.\n2. The poem has exactly four "
        "lines.\n3. End the poem with a question.",
        "Write a short poem about autumn leaves in exactly four lines, and end it with a question.",
    ),
    (
        f"Input: {_CITY}\nConstraints:\n1. Summarize the paragraph.\n2. Use exactly two sentences.\n"
        "3. Do not mention any names.",
        f"Summarize the following paragraph in exactly two sentences without mentioning any names.\n\n{_CITY}",
    ),
)

# -- self-instruct: a new complex instruction when no instruction pool is given
SELF_INSTRUCT = "Come up with one task with more than {n} constraints. Reply with the task only."
SELF_INSTRUCT_DEMOS = (
    (
        "Come up with one task with more than 3 constraints. Reply with the task only.",
        "Write a product description for a reusable water bottle in under 80 words. Mention that it keeps drinks "
        "cold for 24 hours, use a friendly tone, do not use exclamation marks, and end with a call to action.",
    ),
    (
        "Come up with one task with more than 3 constraints. Reply with the task only.",
        "Explain how a rainbow forms to a ten-year-old. Use exactly three paragraphs, include the words 'light' "
        "and 'droplet', avoid the word 'refraction', and finish with a one-sentence summary in bold.",
    ),
)


# Text that only the demos contain: a small model sometimes copies it into its answer instead of the query's.
DEMO_MATERIAL = (_CITY, "autumn leaves", "reusable water bottle", "how a rainbow forms")


def copies_demo(text: str, source: str) -> bool:
    """True when `text` contains demo material that `source` (what the model was asked about) does not."""
    lowered, source = text.lower(), source.lower()
    return any(m[:40].lower() in lowered and m[:40].lower() not in source for m in DEMO_MATERIAL)


def numbered(constraints: Sequence[str]) -> str:
    return "\n".join(f"{i}. {c}" for i, c in enumerate(constraints, 1))


def _few_shot(tokenizer: PreTrainedTokenizerBase, template: str, demos, field: str, **query: str) -> str:
    """`template` filled with each demo's text (in `field`) as earlier turns, then with `query`."""
    turns = [(template.format(**{field: text}), answer) for text, answer in demos]
    return build_few_shot_prompt(tokenizer, turns, template.format(**query))


def decompose_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    return _few_shot(tokenizer, DECOMPOSE, DECOMPOSE_DEMOS, "instruction", instruction=instruction)


def rewrite_prompt(tokenizer: PreTrainedTokenizerBase, kind: str, constraint: str) -> str:
    """The prompt that makes the model substitute or negate one constraint."""
    if kind == "substitute":
        return _few_shot(tokenizer, SUBSTITUTE, SUBSTITUTE_DEMOS, "constraint", constraint=constraint)
    if kind == "negate":
        return _few_shot(tokenizer, NEGATE, NEGATE_DEMOS, "constraint", constraint=constraint)
    raise ValueError(f"only 'substitute' and 'negate' constraints are rewritten; got {kind!r}")


def recombine_prompt(tokenizer: PreTrainedTokenizerBase, task_input: str, constraints: Sequence[str]) -> str:
    body = f"Input: {task_input or 'none'}\nConstraints:\n{numbered(constraints)}"
    return _few_shot(tokenizer, RECOMBINE, RECOMBINE_DEMOS, "body", body=body)


def recombine_template(task_input: str, constraints: Sequence[str]) -> str:
    """Model-free recombination: the core task, the other constraints as a list, then the input."""
    text = constraints[0]
    if len(constraints) > 1:
        text += "\n" + "\n".join(f"- {c}" for c in constraints[1:])
    return f"{text}\n\n{task_input}" if task_input else text


def self_instruct_prompt(tokenizer: PreTrainedTokenizerBase, min_constraints: int) -> str:
    turns = list(SELF_INSTRUCT_DEMOS)
    return build_few_shot_prompt(tokenizer, turns, SELF_INSTRUCT.format(n=min_constraints))
