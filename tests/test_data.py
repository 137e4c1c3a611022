"""Loaders for every shape, cleaning with counted drop reasons, errors that name file/line/field, the bundled pack."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mainlib import data
from mainlib.data import DataError, Pair
from mainlib.paths import BUNDLED_DIR


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_every_jsonl_shape(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Name a colour.", "response": "Blue."},
        {"prompt": "Capital of Peru?", "completion": "Lima."},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"},
            ]
        },
    ]
    path = write(tmp_path / "mixed.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs = data.load_pairs(path)
    assert [(p.instruction, p.response) for p in pairs] == [
        ("Add.\n\n2 and 3", "5"),
        ("Say hi.", "Hi!"),
        ("Name a colour.", "Blue."),
        ("Capital of Peru?", "Lima."),
        ("2+2?", "4"),
    ]
    assert {p.source for p in pairs} == {"mixed"}


def test_json_array_and_csv(tmp_path: Path) -> None:
    json_path = write(tmp_path / "a.json", json.dumps([{"instruction": "A", "response": "B", "weight": 2}], indent=2))
    assert data.load_pairs(json_path) == [Pair("A", "B", "a", 2.0)]
    csv_path = write(tmp_path / "b.csv", 'prompt,completion\n"multi\nline",yes\nq2,a2\n')
    assert [(p.instruction, p.response) for p in data.load_pairs(csv_path)] == [("multi\nline", "yes"), ("q2", "a2")]


def test_pool_shape_needs_opt_in(tmp_path: Path) -> None:
    path = write(tmp_path / "pool.jsonl", '{"response": "The final answer is 4."}\n')
    with pytest.raises(DataError, match="matches no known shape"):
        data.load_pairs(path)
    assert data.load_pairs(path, allow_missing_instruction=True)[0] == Pair("", "The final answer is 4.", "pool")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "bad.jsonl",
            '{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": \n',
            r"bad.jsonl:2: invalid JSON",
        ),
        (
            "shape.jsonl",
            '{"instruction": "a", "response": "b"}\n\n{"question": "q"}\n',
            r"shape.jsonl:3: .*its fields: question",
        ),
        (
            "type.jsonl",
            '{"instruction": "a", "output": 7}\n',
            r"type.jsonl:1: field 'output' must be a string, got int",
        ),
        ("weight.jsonl", '{"instruction": "a", "output": "b", "weight": "x"}\n', r"weight.jsonl:1: field 'weight'"),
        ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', r"chat.jsonl:1: field 'messages' has no"),
        ("arr.json", '[\n {"instruction": "a", "response": "b"},\n\n {"foo": 1}\n]', r"arr.json:4: record matches no"),
        ("obj.json", '{"instruction": "a"}', r"obj.json:1: expected a JSON array"),
        ("rows.csv", "question,answer\nq,a\n", r"rows.csv:2: record matches no known shape"),
        ("x.txt", "hello", r"x.txt: unsupported file type"),
    ],
)
def test_malformed_files_name_file_line_and_field(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        data.load_pairs(write(tmp_path / name, text))


def test_clean_counts_every_drop_reason(tiny_tokenizer) -> None:
    pairs = [
        Pair("  Keep me \r\n", "fine  "),
        Pair("", "no instruction"),
        Pair("no response", "   "),
        Pair("keep   ME", "Fine"),  # duplicate of the first after whitespace/case folding
        Pair("long", "word " * 400),
        Pair("Second", "kept\n\n\n\nwith gaps"),
    ]
    kept, report = data.clean_pairs(pairs, tiny_tokenizer, max_tokens=64)
    assert [(p.instruction, p.response) for p in kept] == [("Keep me", "fine"), ("Second", "kept\n\nwith gaps")]
    assert report.total == 6 and report.kept == 2
    assert report.dropped == {"empty_instruction": 1, "empty_response": 1, "duplicate": 1, "too_long": 1}


def test_clean_pool_keeps_empty_instructions() -> None:
    kept, report = data.clean_pairs([Pair("", "a"), Pair("", "a"), Pair("", "")], require_instruction=False)
    assert len(kept) == 1 and report.dropped["duplicate"] == 1 and report.dropped["empty_response"] == 1


def test_sample_pairs_is_seeded_and_disjoint() -> None:
    pairs = [Pair(str(i), str(i)) for i in range(20)]
    a, rest = data.sample_pairs(pairs, 5, seed=3)
    assert a == data.sample_pairs(pairs, 5, seed=3)[0] and len(rest) == 15 and not set(a) & set(rest)


# ---- the bundled pack ------------------------------------------------------------------------------


def test_bundled_pack_matches_its_manifest() -> None:
    manifest = json.loads((BUNDLED_DIR / "manifest.json").read_text())
    total = 0
    for name, digest in manifest["sha256"].items():
        content = (BUNDLED_DIR / name).read_bytes()
        total += len(content)
        assert hashlib.sha256(content).hexdigest() == digest, name
    assert total <= 2_000_000
    assert (BUNDLED_DIR / "SOURCES.md").read_text().count("Apache-2.0") >= 1
    assert manifest["rows"]["seed.jsonl"] == 200 and manifest["rows"]["unlabeled.jsonl"] == 500


def test_bundled_splits_are_clean_and_disjoint() -> None:
    seed, heldout = data.load_bundled("seed"), data.load_bundled("heldout")
    pool = data.load_bundled("unlabeled")
    complex_rows = data.load_jsonl(BUNDLED_DIR / "complex_instructions.jsonl")
    assert data.clean_pairs(seed)[1].kept == len(seed) == 200
    assert data.clean_pairs(pool, require_instruction=False)[1].kept == len(pool) == 500
    assert all(p.instruction == "" and "<<" not in p.response for p in pool)
    sources = [{p.source for p in seed}, {p.source for p in heldout}, {r["source"] for r in complex_rows}]
    assert sum(map(len, sources)) == len(set().union(*sources))  # no task in two splits
    assert all(len(r["constraints"]) >= 2 and r["instruction"].endswith(r["constraints"][-1]) for r in complex_rows)
    eval_questions = {r["question"] for r in data.load_jsonl(BUNDLED_DIR / "eval" / "gsm8k_test.jsonl")}
    pool_questions = {json.loads(line)["reference_instruction"] for line in (BUNDLED_DIR / "unlabeled.jsonl").open()}
    assert not eval_questions & pool_questions


def test_bundled_pack_rebuilds_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed pack is exactly what the build script makes from $MAINLIB_DATA_DIR."""
    import os
    import subprocess
    import sys

    if not os.environ.get("MAINLIB_DATA_DIR"):
        pytest.skip("MAINLIB_DATA_DIR is not set: cannot rebuild the pack from the public files")
    out = tmp_path / "bundled"
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_bundled_data.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    built = json.loads((out / "manifest.json").read_text())
    assert built["sha256"] == json.loads((BUNDLED_DIR / "manifest.json").read_text())["sha256"]
