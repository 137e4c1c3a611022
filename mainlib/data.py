"""Instruction/response pairs: one record type, loaders for the common file shapes, cleaning with counts.

Shapes understood, per record (JSONL line, JSON array element, CSV row):
- alpaca     `instruction`, optional `input`, `output`   (input is appended to the instruction)
- plain      `instruction`, `response`
- completion `prompt`, `completion`
- chat       `messages`: [{role, content}, ...]           (first user turn -> first assistant turn after it)
- pool       `response` alone (unlabeled responses, with `allow_missing_instruction=True`)

A malformed file raises `DataError` naming the file, the line and the field. Cleaning never fails
silently: every dropped row is counted under its reason.

The bundled pack (`mainlib/data/bundled/`, built by `scripts/build_bundled_data.py`) is read with
`load_bundled`; note that `mainlib/data/` is a plain data folder next to this module, not a package.
"""

from __future__ import annotations

import csv
import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from mainlib.paths import BUNDLED_DIR

SHAPES = "alpaca (instruction[, input], output), instruction/response, prompt/completion, messages"


class DataError(ValueError):
    """A data file that cannot be read as pairs; the message names file, line and field."""


@dataclass(frozen=True)
class Pair:
    """One instruction/response example. `weight` scales its loss in SFT (see `sft.example_weights`)."""

    instruction: str
    response: str
    source: str = ""
    weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Reading records from files, with their line numbers
# --------------------------------------------------------------------------------------------------


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded record) for each non-blank line; invalid JSON is an error naming file:line."""
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on (decoded one by one for that)."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise DataError(f"{path}:1: expected a JSON array of records (or use .jsonl, one record per line)")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: unterminated JSON array")
        if text[pos] == "]":
            return
        line_no = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield line_no, record


def _csv_records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield reader.line_num, row


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, raw record) for every record of a .jsonl, .json or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    readers = {".jsonl": jsonl_records, ".json": _json_records, ".csv": _csv_records}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")
    return readers[suffix](path)


# --------------------------------------------------------------------------------------------------
# Records -> pairs
# --------------------------------------------------------------------------------------------------


def _text_field(record: dict, name: str, where: str) -> str:
    value = record[name]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _from_messages(record: dict, where: str) -> tuple[str, str]:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: field 'messages' must be a list of {{role, content}}")
    instruction = response = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: field 'messages[{i}]' must have 'role' and 'content'")
        if message["role"] == "user" and instruction is None:
            instruction = message["content"]
        elif message["role"] == "assistant" and instruction is not None:
            response = message["content"]
            break
    if instruction is None or response is None:
        raise DataError(f"{where}: field 'messages' has no user turn followed by an assistant turn")
    return instruction, response


def record_to_pair(record: Any, where: str, source: str = "", allow_missing_instruction: bool = False) -> Pair:
    """Recognise the record's shape and build a Pair. `where` is `file:line`, used in error messages."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with fields ({SHAPES}), got {type(record).__name__}")
    if "messages" in record:
        instruction, response = _from_messages(record, where)
    elif "instruction" in record and "output" in record:
        instruction = _text_field(record, "instruction", where)
        extra = _text_field(record, "input", where) if "input" in record else ""
        instruction = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        response = _text_field(record, "output", where)
    elif "instruction" in record and "response" in record:
        instruction = _text_field(record, "instruction", where)
        response = _text_field(record, "response", where)
    elif "prompt" in record and "completion" in record:
        instruction = _text_field(record, "prompt", where)
        response = _text_field(record, "completion", where)
    elif allow_missing_instruction and "response" in record:
        instruction, response = "", _text_field(record, "response", where)
    else:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(f"{where}: record matches no known shape ({SHAPES}); its fields: {fields}")
    weight = record.get("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        raise DataError(f"{where}: field 'weight' must be a number, got {type(weight).__name__}")
    return Pair(instruction, response, str(record.get("source") or source), float(weight))


def load_pairs(path: str | Path, source: str | None = None, allow_missing_instruction: bool = False) -> list[Pair]:
    """Read every record of a .jsonl/.json/.csv file as a Pair (no cleaning; see `clean_pairs`)."""
    path = Path(path)
    source = path.stem if source is None else source
    return [
        record_to_pair(record, f"{path}:{line_no}", source, allow_missing_instruction)
        for line_no, record in read_records(path)
    ]


def load_hub_pairs(dataset_id: str, split: str = "train", source: str | None = None, **kwargs: Any) -> list[Pair]:
    """Pairs from a Hugging Face dataset id (needs hub access; never used in tests)."""
    from datasets import load_dataset

    dataset = load_dataset(dataset_id, split=split, **kwargs)
    return [
        record_to_pair(dict(row), f"{dataset_id}[{split}]:{i}", source or dataset_id) for i, row in enumerate(dataset)
    ]


# --------------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Unicode NFC, Unix newlines, no trailing spaces on lines, at most one blank line in a row, stripped."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _dedup_key(pair: Pair) -> tuple[str, str]:
    squash = lambda s: re.sub(r"\s+", " ", s).casefold()  # noqa: E731 - a one-line local helper
    return squash(pair.instruction), squash(pair.response)


@dataclass
class CleanReport:
    """How many rows came in, how many were kept, and how many were dropped for each reason."""

    total: int
    kept: int
    dropped: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clean_pairs(
    pairs: Iterable[Pair],
    tokenizer: Any | None = None,
    max_tokens: int | None = None,
    require_instruction: bool = True,
) -> tuple[list[Pair], CleanReport]:
    """Normalise, then drop empty rows, duplicates and rows over `max_tokens` (instruction + response tokens).

    Reasons counted: `empty_instruction`, `empty_response`, `duplicate`, `too_long`. Order is kept; of
    duplicates the first is kept. Token capping needs `tokenizer`.
    """
    if max_tokens is not None and tokenizer is None:
        raise ValueError("clean_pairs(max_tokens=...) needs a tokenizer to count tokens")
    dropped: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    kept: list[Pair] = []
    total = 0
    for pair in pairs:
        total += 1
        pair = replace(pair, instruction=normalize_text(pair.instruction), response=normalize_text(pair.response))
        if require_instruction and not pair.instruction:
            dropped["empty_instruction"] += 1
            continue
        if not pair.response:
            dropped["empty_response"] += 1
            continue
        key = _dedup_key(pair)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        if max_tokens is not None:
            n_tokens = len(tokenizer(pair.instruction + "\n" + pair.response, add_special_tokens=False)["input_ids"])
            if n_tokens > max_tokens:
                dropped["too_long"] += 1
                continue
        kept.append(pair)
    report = CleanReport(total=total, kept=len(kept), dropped={k: dropped.get(k, 0) for k in DROP_REASONS})
    return kept, report


DROP_REASONS = ("empty_instruction", "empty_response", "duplicate", "too_long")


# --------------------------------------------------------------------------------------------------
# The bundled pack
# --------------------------------------------------------------------------------------------------

BUNDLED_FILES = {
    "seed": "seed.jsonl",  # ~200 human-written pairs (Self-Instruct, Apache-2.0)
    "heldout": "heldout.jsonl",  # pairs never trained on, for ground-truth checks of the scorer
    "unlabeled": "unlabeled.jsonl",  # ~500 responses without instructions (GSM8K train solutions, MIT)
    "complex_instructions": "complex_instructions.jsonl",  # ~100 multi-constraint instructions for MuSC
}


def bundled_path(*parts: str) -> Path:
    """A file of the bundled pack, e.g. `bundled_path("eval", "gsm8k_test.jsonl")`."""
    path = BUNDLED_DIR.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is not in the bundled pack; rebuild it with scripts/build_bundled_data.py")
    return path


def load_bundled(name: str) -> list[Pair]:
    """One split of the bundled pack as pairs: `seed`, `heldout` or `unlabeled` (instruction empty)."""
    if name not in ("seed", "heldout", "unlabeled"):
        raise ValueError(f"unknown bundled split {name!r}; choose seed, heldout or unlabeled")
    return load_pairs(bundled_path(BUNDLED_FILES[name]), allow_missing_instruction=(name == "unlabeled"))


def load_source(spec: str, allow_missing_instruction: bool = False) -> list[Pair]:
    """Pairs from a data spec: `bundled:<split>`, `hf:<dataset_id>[@<split>]` (hub), or a file path.

    `allow_missing_instruction` reads unlabeled pools (records with a `response` only).
    """
    if spec.startswith("bundled:"):
        return load_bundled(spec.removeprefix("bundled:"))
    if spec.startswith("hf:"):
        dataset_id, _, split = spec.removeprefix("hf:").partition("@")
        return load_hub_pairs(dataset_id, split or "train")
    return load_pairs(spec, allow_missing_instruction=allow_missing_instruction)


def sample_pairs(pairs: list[Pair], n: int | None, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A seeded random sample of `n` pairs (all when n is None) and the rest, each in the original order."""
    if n is None or n >= len(pairs):
        return list(pairs), []
    chosen = set(random.Random(seed).sample(range(len(pairs)), n))
    return [p for i, p in enumerate(pairs) if i in chosen], [p for i, p in enumerate(pairs) if i not in chosen]


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Raw records of a JSONL file (for files that are not pairs, e.g. complex instructions, eval sets)."""
    return [record for _, record in jsonl_records(Path(path))]
