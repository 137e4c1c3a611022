"""Instruction/response pairs: one record type, loaders for the common file shapes, cleaning with counts.

Shapes understood, per record (JSONL line, JSON array element, CSV row):
- alpaca     `instruction`, optional `input`, `output`   (input is appended to the instruction)
- plain      `instruction`, `response`
- completion `prompt`, `completion`
- chat       `messages`: [{role, content}, ...]           (first user turn -> first assistant turn after it)
- pool       `response` alone (unlabeled responses, with `allow_missing_instruction=True`)

A record may carry `weight`, a finite number >= 0 (default 1; 0 leaves it out of the loss). Files are UTF-8;
a leading BOM is skipped. A malformed file (bytes that are not UTF-8, a field of the wrong type, a CSV row of
another width than its header, no records at all) raises `DataError` naming the file, the line and the field.
Cleaning never fails silently: every dropped row is counted under its reason.

The bundled pack (`mainlib/data/bundled/`, built by `scripts/build_bundled_data.py`) is read with
`load_bundled`; note that `mainlib/data/` is a plain data folder next to this module, not a package.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
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
    """One instruction/response example. `weight` (finite, >= 0) scales its loss in SFT (see `sft.example_weights`)."""

    instruction: str
    response: str
    source: str = ""
    weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Reading records from files, with their line numbers
# --------------------------------------------------------------------------------------------------


def _first_bad_utf8(path: Path) -> str:
    """`file:line: ...` for the first byte that is not UTF-8 (a line is decoded alone: no UTF-8 character spans
    a newline byte), so the user can find it; a bare UnicodeDecodeError names neither file nor line."""
    offset = 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"{path}:{line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {offset + e.start}); "
                    "data files must be UTF-8 (a BOM is fine): re-save the file as UTF-8"
                )
            offset += len(raw)
    return f"{path}: not UTF-8; data files must be UTF-8 (a BOM is fine): re-save the file as UTF-8"


def _utf8_checked(path: Path, records: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """`records`, with a decoding failure turned into a DataError that names the line and the byte."""
    try:
        yield from records
    except UnicodeDecodeError:
        raise DataError(_first_bad_utf8(path)) from None


def _json_problem(e: ValueError) -> str:
    """What the JSON decoder objected to: a syntax error and its column, or a number it cannot hold."""
    return f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig") as f:  # -sig: a leading BOM (Windows editors) is skipped
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({_json_problem(e)})") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded record) for each non-blank line; invalid JSON or UTF-8 is an error naming file:line."""
    return _utf8_checked(path, _jsonl_records(path))


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on (decoded one by one for that)."""
    text = path.read_text(encoding="utf-8-sig")
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
            _nothing_after(path, text, pos + 1)
            return
        line_no = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except ValueError as e:
            line_no = e.lineno if isinstance(e, json.JSONDecodeError) else line_no
            raise DataError(f"{path}:{line_no}: invalid JSON ({_json_problem(e)})") from None
        yield line_no, record


def _nothing_after(path: Path, text: str, pos: int) -> None:
    """Text after the array's `]` is an error: it is usually a second array or a cut-and-paste slip."""
    rest = text[pos:].lstrip()
    if rest:
        line_no = text.count("\n", 0, len(text) - len(rest)) + 1
        raise DataError(f"{path}:{line_no}: unexpected text after the array's closing ']': {rest[:20]!r}")


CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default, 131072 characters, is one long response


def _csv_header(path: Path, reader: Any) -> list[str]:
    """The first non-blank row, names stripped ("instruction, response" works); duplicate names are an error."""
    header = [name.strip() for name in next((row for row in reader if row), [])]
    duplicates = sorted(name for name, n in Counter(header).items() if n > 1 and name)
    if duplicates:
        raise DataError(
            f"{path}:{reader.line_num}: duplicate column name(s) in the header: {', '.join(duplicates)}; "
            "each column needs a name of its own"
        )
    return header


def _csv_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows as {column: cell} with the line each starts on; a row of another width than the header, or broken
    quoting, is an error (the csv module would silently pad, drop, or swallow the rest of the file)."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader, end = csv.reader(f, strict=True), 0
        try:
            header = _csv_header(path, reader)
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:  # a blank line
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{start}: {len(row)} field{'s' * (len(row) != 1)}, but the header has "
                        f"{len(header)} ({', '.join(header)}); quote cells that hold commas"
                    )
                yield start, _csv_numbers({name: cell for name, cell in zip(header, row, strict=True) if name})
        except csv.Error as e:
            raise DataError(f"{path}:{end + 1}: malformed CSV in the record from here ({e}); check quotes") from None


def _csv_numbers(row: dict[str, str]) -> dict[str, Any]:
    """A CSV `weight` cell as a number (every cell is text); one that does not parse stays text, for the error."""
    if "weight" in row:
        with contextlib.suppress(ValueError):
            row["weight"] = float(row["weight"])
    return row


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, raw record) for every record of a .jsonl, .json or .csv file (UTF-8, with or without BOM)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    readers = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .csv")
    return _utf8_checked(path, readers[suffix](path))


# --------------------------------------------------------------------------------------------------
# Records -> pairs
# --------------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    """A value's type as the error reads it: `null` for JSON null rather than Python's NoneType."""
    return "null" if value is None else type(value).__name__


def _text_field(record: dict, name: str, where: str) -> str:
    value = record[name]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {_type_name(value)}")
    return value


def _message_part(message: dict, i: int, key: str, where: str) -> str:
    """A chat message's `role` or `content`: a string (a number would reach the tokenizer, null hide a turn)."""
    value = message[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field 'messages[{i}].{key}' must be a string, got {_type_name(value)}")
    return value


def _from_messages(record: dict, where: str) -> tuple[str, str]:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: field 'messages' must be a list of {{role, content}}, got {_type_name(messages)}")
    instruction = response = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: field 'messages[{i}]' must have 'role' and 'content'")
        role, content = _message_part(message, i, "role", where), _message_part(message, i, "content", where)
        if role == "user" and instruction is None:
            instruction = content
        elif role == "assistant" and instruction is not None:
            response = content
            break
    if instruction is None or response is None:
        raise DataError(f"{where}: field 'messages' has no user turn followed by an assistant turn")
    return instruction, response


WEIGHT_RANGE = "a finite number >= 0 (0: the row adds nothing to the loss)"


def _weight(record: dict, where: str) -> float:
    """The record's loss weight, 1 when absent. NaN trains a NaN adapter and a negative weight trains by gradient
    ascent, both silently, so anything but a finite number >= 0 is an error here."""
    value = record.get("weight", 1.0)
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer of 400 digits
            number = math.inf
    if not (math.isfinite(number) and number >= 0):
        shown = "null" if value is None else repr(value) if len(repr(value)) <= 24 else repr(value)[:20] + "..."
        raise DataError(f"{where}: field 'weight' must be {WEIGHT_RANGE}, got {shown}")
    return number


def record_to_pair(record: Any, where: str, source: str = "", allow_missing_instruction: bool = False) -> Pair:
    """Recognise the record's shape and build a Pair. `where` is `file:line`, used in error messages."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with fields ({SHAPES}), got {_type_name(record)}")
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
    return Pair(instruction, response, str(record.get("source") or source), _weight(record, where))


def load_pairs(path: str | Path, source: str | None = None, allow_missing_instruction: bool = False) -> list[Pair]:
    """Read every record of a .jsonl/.json/.csv file as a Pair (no cleaning; see `clean_pairs`).

    A file with no records, or whose records all have weight 0, is an error: either would train on nothing.
    """
    path = Path(path)
    source = path.stem if source is None else source
    pairs = [
        record_to_pair(record, f"{path}:{line_no}", source, allow_missing_instruction)
        for line_no, record in read_records(path)
    ]
    if not pairs:
        raise DataError(f"{path}: no records (the file is empty); expected records of the shapes {SHAPES}")
    if not any(pair.weight for pair in pairs):
        raise DataError(f"{path}: every record has weight 0, so there is nothing to train on; give rows weight > 0")
    return pairs


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
