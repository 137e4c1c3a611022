"""Forward and reverse examples supervise exactly their target tokens."""

from __future__ import annotations

from mainlib import prompts

INSTRUCTION = "List two prime numbers."
RESPONSE = "Two primes are 3 and 7."


def supervised_text(tokenizer, encoded: prompts.Encoded) -> str:
    return tokenizer.decode([t for t in encoded.labels if t != -100])


def test_forward_supervises_only_the_response(tiny_tokenizer) -> None:
    enc = prompts.encode(tiny_tokenizer, "forward", INSTRUCTION, RESPONSE)
    assert supervised_text(tiny_tokenizer, enc) == RESPONSE + "<|im_end|>"
    prompt = tiny_tokenizer.decode(enc.input_ids[: enc.prompt_len])
    assert prompt == f"<|im_start|>user\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert all(label == -100 for label in enc.labels[: enc.prompt_len])
    assert enc.labels[enc.prompt_len :] == enc.input_ids[enc.prompt_len :]


def test_reverse_supervises_only_the_instruction(tiny_tokenizer) -> None:
    enc = prompts.encode(tiny_tokenizer, "reverse", INSTRUCTION, RESPONSE)
    assert supervised_text(tiny_tokenizer, enc) == INSTRUCTION + "<|im_end|>"
    prompt = tiny_tokenizer.decode(enc.input_ids[: enc.prompt_len])
    assert prompts.REVERSE_TEMPLATE.format(response=RESPONSE) in prompt and INSTRUCTION not in prompt


def test_system_tag_goes_into_the_prompt(tiny_tokenizer) -> None:
    enc = prompts.encode(tiny_tokenizer, "forward", INSTRUCTION, RESPONSE, system="Answer with web knowledge.")
    assert tiny_tokenizer.decode(enc.input_ids[: enc.prompt_len]).startswith(
        "<|im_start|>system\nAnswer with web knowledge.<|im_end|>"
    )
    assert supervised_text(tiny_tokenizer, enc) == RESPONSE + "<|im_end|>"


def test_max_length_cuts_the_target_not_the_prompt(tiny_tokenizer) -> None:
    full = prompts.encode(tiny_tokenizer, "forward", INSTRUCTION, RESPONSE * 5)
    cut = prompts.encode(tiny_tokenizer, "forward", INSTRUCTION, RESPONSE * 5, max_length=full.prompt_len + 3)
    assert cut.prompt_len == full.prompt_len and len(cut.input_ids) == full.prompt_len + 3
    assert cut.input_ids == full.input_ids[: full.prompt_len + 3]


def test_plain_layout_without_chat_template(tiny_tokenizer) -> None:
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = None
    forward = prompts.encode(tokenizer, "forward", INSTRUCTION, RESPONSE)
    assert tokenizer.decode(forward.input_ids[: forward.prompt_len]).endswith(
        f"### Instruction:\n{INSTRUCTION}\n\n### Response:\n"
    )
    assert supervised_text(tokenizer, forward) == RESPONSE + tokenizer.eos_token
    reverse = prompts.encode(tokenizer, "reverse", INSTRUCTION, RESPONSE)
    assert supervised_text(tokenizer, reverse) == INSTRUCTION + tokenizer.eos_token
