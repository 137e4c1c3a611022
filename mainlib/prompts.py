"""Prompt templates for the two directions, and the tokenisation that marks which tokens are the target.

- forward  p(y|x): the model's own chat template; the instruction is the user turn, the response the
  assistant turn.
- reverse  p(x|y): a fixed template (`REVERSE_TEMPLATE`) that shows the response in the user turn and asks
  for the instruction it answers; the instruction is the assistant turn.
- models without a chat template (base models) get a plain `### Instruction / ### Response` layout.

Every consumer (SFT, generation, likelihood scoring) goes through `build_prompt` / `encode`, so the
tokens trained on are exactly the tokens scored and generated from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

Direction = Literal["forward", "reverse"]

# The reverse direction's user turn. Kept short and literal so a small model follows it; documented in
# the README. `{response}` is the only field.
REVERSE_TEMPLATE = (
    "Here is a response written by an AI assistant:\n\n"
    "{response}\n\n"
    "Write the user instruction that this response answers. Reply with the instruction only."
)

# Fallback for tokenizers without a chat template (base models).
PLAIN_FORWARD = "### Instruction:\n{instruction}\n\n### Response:\n"
PLAIN_REVERSE = "### Response:\n{response}\n\n### The instruction this response answers:\n"


@dataclass(frozen=True)
class Encoded:
    """Token ids of one (prompt, target) example; `labels` is -100 on the prompt so only the target is learned."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int

    @property
    def target_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len :]


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_turn(direction: Direction, instruction: str, response: str) -> str:
    """What the model is conditioned on: the instruction (forward) or the reverse template around the response."""
    if direction == "forward":
        return instruction
    if direction == "reverse":
        return REVERSE_TEMPLATE.format(response=response)
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")


def target_text(direction: Direction, instruction: str, response: str) -> str:
    """What the model learns to write: the response (forward) or the instruction (reverse)."""
    return response if direction == "forward" else instruction


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    direction: Direction,
    instruction: str = "",
    response: str = "",
    system: str | None = None,
) -> str:
    """The prompt text up to where the target starts (the generation prompt), as a string."""
    if not has_chat_template(tokenizer):
        plain = PLAIN_FORWARD if direction == "forward" else PLAIN_REVERSE
        prefix = f"{system}\n\n" if system else ""
        return prefix + plain.format(instruction=instruction, response=response)
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_turn(direction, instruction, response)})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _chat_target_suffix(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    direction: Direction,
    instruction: str,
    response: str,
    system: str | None,
) -> str:
    """The text the chat template puts after the generation prompt for this target, cut after EOS."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user_turn(direction, instruction, response)})
    messages.append({"role": "assistant", "content": target_text(direction, instruction, response)})
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template does not render the conversation as prompt + answer; "
            "use a tokenizer whose template is prefix-consistent or remove its chat_template for the plain layout"
        )
    suffix = full[len(prompt) :]
    eos = tokenizer.eos_token
    if eos and eos in suffix:  # learn to stop at EOS; what the template adds after it is not a target
        suffix = suffix[: suffix.index(eos) + len(eos)]
    return suffix


def encode(
    tokenizer: PreTrainedTokenizerBase,
    direction: Direction,
    instruction: str,
    response: str,
    system: str | None = None,
    max_length: int | None = None,
) -> Encoded:
    """Tokenise one pair for `direction`: prompt tokens get label -100, target tokens (and EOS) keep their ids.

    Prompt and target are tokenised separately and concatenated, so a target never merges with the last
    prompt token and the split point is exact. `max_length` truncates the target's end (never the prompt);
    an example whose prompt alone reaches `max_length` keeps no target and is reported by the caller.
    """
    prompt = build_prompt(tokenizer, direction, instruction, response, system)
    if has_chat_template(tokenizer):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        suffix = _chat_target_suffix(tokenizer, prompt, direction, instruction, response, system)
        target_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(target_text(direction, instruction, response), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            target_ids = [*target_ids, tokenizer.eos_token_id]
    if max_length is not None:
        target_ids = target_ids[: max(0, max_length - len(prompt_ids))]
    input_ids = prompt_ids + target_ids
    labels = [-100] * len(prompt_ids) + target_ids
    return Encoded(input_ids=input_ids, labels=labels, prompt_len=len(prompt_ids))


def build_few_shot_prompt(
    tokenizer: PreTrainedTokenizerBase,
    demos: Sequence[tuple[str, str]],
    query: str,
    system: str | None = None,
) -> str:
    """A generation prompt with (user, assistant) demo turns before the `query` user turn.

    Small chat models imitate a shape far better from earlier turns than from a description of it.
    Without a chat template the turns use the plain `### Instruction / ### Response` layout.
    """
    if not has_chat_template(tokenizer):
        blocks = [PLAIN_FORWARD.format(instruction=q) + a for q, a in demos]
        prefix = f"{system}\n\n" if system else ""
        return prefix + "\n\n".join([*blocks, PLAIN_FORWARD.format(instruction=query)])
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in demos:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": query})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
