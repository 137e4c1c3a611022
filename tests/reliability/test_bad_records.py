"""Bad records and diverging training (issue 13): a clear error naming file:line and field, never a bare traceback,
a NaN adapter, or a stage marked complete.

Each table row is one file as a user might hand it over, and what the loader must say about it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mainlib import data
from mainlib.data import DataError, Pair
from mainlib.training import StopOnNonFinite, TrainingDiverged

GOOD = '{"instruction": "a", "response": "b"}\n'


def pair_line(weight: str) -> str:
    return '{"instruction": "c", "response": "d", "weight": ' + weight + "}\n"


# (file name, content: str is written as UTF-8, bytes as they are), error, substrings the message must contain
BAD_FILES = [
    # 1. record weights: finite and >= 0
    ("nan.jsonl", GOOD * 2 + pair_line("NaN"), DataError, ["nan.jsonl:3", "'weight'", "finite", ">= 0", "nan"]),
    ("neg.jsonl", GOOD * 2 + pair_line("-1"), DataError, ["neg.jsonl:3", "'weight'", ">= 0", "-1"]),
    ("inf.jsonl", GOOD * 2 + pair_line("Infinity"), DataError, ["inf.jsonl:3", "'weight'", "finite", "inf"]),
    ("e400.jsonl", GOOD * 2 + pair_line("1e400"), DataError, ["e400.jsonl:3", "'weight'", "finite"]),
    ("bigint.jsonl", GOOD * 2 + pair_line("1" + "0" * 400), DataError, ["bigint.jsonl:3", "'weight'", "finite"]),
    ("str.jsonl", GOOD * 2 + pair_line('"2"'), DataError, ["str.jsonl:3", "'weight'", ">= 0", "'2'"]),
    ("null.jsonl", GOOD * 2 + pair_line("null"), DataError, ["null.jsonl:3", "'weight'", ">= 0", "got null"]),
    ("bool.jsonl", GOOD * 2 + pair_line("true"), DataError, ["bool.jsonl:3", "'weight'", ">= 0"]),
    ("nan.json", '[\n {"instruction": "a", "response": "b", "weight": NaN}\n]', DataError, ["nan.json:2", "finite"]),
    ("nan.csv", "instruction,response,weight\na,b,1\nc,d,nan\n", DataError, ["nan.csv:3", "'weight'", "finite"]),
    ("blank.csv", "instruction,response,weight\na,b,1\nc,d,\n", DataError, ["blank.csv:3", "'weight'", "''"]),
    ("zeros.jsonl", pair_line("0") + pair_line("0.0"), DataError, ["zeros.jsonl", "weight 0", "nothing to train on"]),
    # 3. not UTF-8: the line and the byte, and what is required
    (
        "latin1.jsonl",
        (GOOD + '{"instruction": "caf\xe9", "response": "d"}\n').encode("latin-1"),
        DataError,
        ["latin1.jsonl:2", "UTF-8", "0xe9", "byte offset 58"],
    ),
    (
        "latin1.csv",
        "instruction,response\na,b\ncaf\xe9,d\n".encode("latin-1"),
        DataError,
        ["latin1.csv:3", "UTF-8", "0xe9", "byte offset 28"],
    ),
    (
        "latin1.json",
        ('[{"instruction": "a", "response": "b"},\n{"instruction": "\xe9", "response": "d"}]').encode("latin-1"),
        DataError,
        ["latin1.json:2", "UTF-8", "0xe9"],
    ),
    ("utf16.jsonl", GOOD.encode("utf-16"), DataError, ["utf16.jsonl:1", "UTF-8", "byte offset 0"]),
    # 3. chat messages: lists of {role, content}, both strings
    (
        "num.jsonl",
        GOOD + '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n',
        DataError,
        ["num.jsonl:2", "'messages[0].content'", "string", "got int"],
    ),
    (
        "none.jsonl",
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}\n',
        DataError,
        ["none.jsonl:1", "'messages[1].content'", "string", "got null"],
    ),
    (
        "role.jsonl",
        '{"messages": [{"role": 1, "content": "q"}, {"role": "assistant", "content": "x"}]}\n',
        DataError,
        ["role.jsonl:1", "'messages[0].role'", "string", "got int"],
    ),
    ("notlist.jsonl", '{"messages": "hello"}\n', DataError, ["notlist.jsonl:1", "'messages'", "list", "got str"]),
    ("turn.jsonl", '{"messages": [{"role": "user"}]}\n', DataError, ["turn.jsonl:1", "'messages[0]'", "'content'"]),
    # 3. rows that are not objects, empty files, trailing garbage
    ("list.jsonl", GOOD + '["a", "b"]\n', DataError, ["list.jsonl:2", "expected an object", "got list"]),
    ("string.jsonl", GOOD + '"hello"\n', DataError, ["string.jsonl:2", "expected an object", "got str"]),
    ("nullrow.jsonl", GOOD + "null\n", DataError, ["nullrow.jsonl:2", "expected an object", "got null"]),
    ("empty.jsonl", "", DataError, ["empty.jsonl", "no records"]),
    ("spaces.jsonl", "\n  \n\n", DataError, ["spaces.jsonl", "no records"]),
    ("empty.json", "[]", DataError, ["empty.json", "no records"]),
    ("empty.csv", "", DataError, ["empty.csv", "no records"]),
    ("header.csv", "instruction,response\n", DataError, ["header.csv", "no records"]),
    ("gap.jsonl", GOOD + "\n" + '{"question": "q"}\n', DataError, ["gap.jsonl:3", "its fields: question"]),
    ("tail.jsonl", GOOD + GOOD.strip() + " xyz\n", DataError, ["tail.jsonl:2", "invalid JSON"]),
    ("tail.json", '[{"instruction": "a", "response": "b"}]\ngarbage', DataError, ["tail.json:2", "after the array"]),
    # siblings in the CSV reader: rows of another width, duplicate names, broken quoting
    ("short.csv", "instruction,response\na,b\nc\n", DataError, ["short.csv:3", "1 field", "header has 2"]),
    ("wide.csv", "instruction,response\na,b\nc,d,e\n", DataError, ["wide.csv:3", "3 fields", "header has 2"]),
    ("dup.csv", "instruction,response,response\na,b,c\n", DataError, ["dup.csv:1", "duplicate", "response"]),
    ("quote.csv", 'instruction,response\na,b\nc,"d\ne,f\n', DataError, ["quote.csv:3", "CSV"]),
]


@pytest.mark.parametrize(("name", "content", "error", "substrings"), BAD_FILES, ids=[row[0] for row in BAD_FILES])
def test_bad_file_is_one_clear_error(tmp_path: Path, name: str, content, error: type, substrings: list[str]) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(error) as caught:
        data.load_pairs(path)
    for part in substrings:
        assert part in str(caught.value), (part, str(caught.value))


# (file name, content, the pairs it holds as (instruction, response, weight))
GOOD_FILES = [
    ("zero.jsonl", pair_line("0") + GOOD, [("c", "d", 0.0), ("a", "b", 1.0)]),  # weight 0: read, adds no loss
    ("bom.jsonl", "\ufeff" + GOOD, [("a", "b", 1.0)]),
    ("bom.json", '\ufeff[{"instruction": "a", "response": "b"}]', [("a", "b", 1.0)]),
    ("bom.csv", "\ufeffinstruction,response\na,b\n", [("a", "b", 1.0)]),
    ("weight.csv", "instruction,response,weight\na,b,2\nc,d,0.5\n", [("a", "b", 2.0), ("c", "d", 0.5)]),
    ("spaced.csv", "instruction, response\na,b\n", [("a", "b", 1.0)]),
    ("long.csv", "instruction,response\na," + "x" * 200_000 + "\n", [("a", "x" * 200_000, 1.0)]),
    ("quoted.csv", 'instruction,response\n"two\nlines","b"\n\nc,d\n', [("two\nlines", "b", 1.0), ("c", "d", 1.0)]),
    ("gap.jsonl", GOOD + "\n" + GOOD, [("a", "b", 1.0), ("a", "b", 1.0)]),  # a blank line is skipped
]


@pytest.mark.parametrize(("name", "content", "expected"), GOOD_FILES, ids=[row[0] for row in GOOD_FILES])
def test_tolerated_files_load(tmp_path: Path, name: str, content: str, expected: list) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8", newline="")
    assert [(p.instruction, p.response, p.weight) for p in data.load_pairs(path)] == expected


def test_csv_line_numbers_count_quoted_newlines(tmp_path: Path) -> None:
    """A record spanning lines 2-3 is followed by a bad one on line 4, not on the reader's row 3."""
    path = tmp_path / "multi.csv"
    path.write_text('instruction,response,weight\n"a\nb",c,1\nd,e,-2\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"multi\.csv:4: field 'weight'"):
        data.load_pairs(path)


def test_jsonl_records_reports_non_utf8(tmp_path: Path) -> None:
    """The raw JSONL reader (pipeline files, MuSC instructions) reports the line too."""
    path = tmp_path / "instructions.jsonl"
    path.write_bytes(b'{"instruction": "a"}\n{"instruction": "\xff"}\n')
    with pytest.raises(DataError, match=r"instructions\.jsonl:2: .*UTF-8"):
        data.load_jsonl(path)


# --------------------------------------------------------------------------------------------------
# Weights that reach the trainer without a file (the Python API)
# --------------------------------------------------------------------------------------------------

WEIGHT_LISTS = [
    ([1.0, math.nan], ["example 1", "nan", "finite"]),
    ([1.0, -1.0], ["example 1", "-1.0", ">= 0"]),
    ([math.inf, 1.0], ["example 0", "inf"]),
    ([0.0, 0.0], ["every example has weight 0", "nothing to train on"]),
]


@pytest.mark.parametrize(("weights", "substrings"), WEIGHT_LISTS)
def test_sft_dataset_rejects_bad_weights(tiny_tokenizer, weights: list[float], substrings: list[str]) -> None:
    from mainlib.sft import SFTSettings, build_dataset

    pairs = [Pair("Name a fruit.", "An apple.", "", w) for w in weights]
    with pytest.raises(ValueError) as caught:
        build_dataset(pairs, tiny_tokenizer, SFTSettings(max_length=64))
    for part in substrings:
        assert part in str(caught.value), (part, str(caught.value))


@pytest.mark.parametrize("bad", [math.nan, -0.5, math.inf])
def test_dpo_token_weights_must_be_finite_and_non_negative(tiny_tokenizer, bad: float) -> None:
    from mainlib.musc.tdpo import preference_dataset
    from mainlib.prompts import encode

    row = {"prompt": "Say hello.", "chosen": "hello", "rejected": "HELLO!"}
    ids = encode(tiny_tokenizer, "forward", row["prompt"], row["chosen"]).target_ids
    row["chosen_weights"] = {"token_ids": ids, "weights": [1.0] * (len(ids) - 1) + [bad]}
    with pytest.raises(ValueError, match=r"pair 0: the chosen token weights .*finite and >= 0"):
        preference_dataset([row], tiny_tokenizer, 512)


# --------------------------------------------------------------------------------------------------
# 2. A diverging run stops with TrainingDiverged, and nothing is saved or marked complete
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def pipeline_config(main_config, tmp_path: Path):
    """The tiny MAIN pipeline (tests/conftest.py `main_config`), with a seed file of our own."""
    import dataclasses

    from mainlib.models import LoraSettings

    seed = tmp_path / "seed.jsonl"
    pairs = [
        ("Name a fruit.", "An apple."),
        ("What is 2 + 2?", "4."),
        ("Say yes.", "Yes."),
        ("Count to 3.", "1, 2, 3."),
    ]
    seed.write_text("".join(json.dumps({"instruction": x, "response": y}) + "\n" for x, y in pairs))
    main_config.sft.epochs, main_config.lora = 3, LoraSettings(r=4, alpha=8, dropout=0.0)
    return dataclasses.replace(main_config, run_name="diverge", seed_data=str(seed))


def test_diverging_stage_raises_and_writes_no_manifest(pipeline_config) -> None:
    """lr 1e30: step 1 is finite, step 2's gradient is NaN. Seen before: logged loss 0.0, a NaN adapter, stage done."""
    from mainlib.pipeline import run_main

    pipeline_config.sft.learning_rate = 1e30
    pipeline_config.sft.logging_steps = 50  # the check is per optimizer step, not per log row
    with pytest.raises(TrainingDiverged, match=r"step 2 of 3: the gradient norm is nan.*lower learning rate"):
        run_main(pipeline_config, until="init_sft")
    stage = Path(pipeline_config.runs_dir) / pipeline_config.run_name / "init_sft"
    assert (stage.parent / "inputs" / "manifest.json").is_file()
    assert not (stage / "manifest.json").exists()
    assert not list(stage.rglob("adapter_model.safetensors")) and not list(stage.rglob("sft_result.json"))
    assert not (stage / "forward" / "trainer").exists()  # not even TRL's empty output folder


def test_nan_weight_in_seed_file_stops_before_any_stage(pipeline_config) -> None:
    """Seen before: the NaN-weighted seed trained a NaN adapter and init_sft was marked complete."""
    from mainlib.parameters import ConfigError
    from mainlib.pipeline import run_main

    Path(pipeline_config.seed_data).write_text(GOOD + pair_line("NaN"))
    with pytest.raises(ConfigError, match=r"seed\.jsonl:2: field 'weight' must be a finite number >= 0"):
        run_main(pipeline_config, until="init_sft")
    assert not (Path(pipeline_config.runs_dir) / pipeline_config.run_name / "init_sft").exists()


def test_diverging_dpo_raises(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    from peft import LoraConfig

    from mainlib.models import load_model
    from mainlib.musc.tdpo import DPOSettings, train_tdpo

    rows = [{"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Apples are red."}] * 2
    settings = DPOSettings(learning_rate=1e30, epochs=3, batch_size=2, warmup=0.0, scheduler="constant")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with pytest.raises(TrainingDiverged, match=r"step 2 of 3: the gradient norm is nan"):
        train_tdpo(load_model(str(tiny_model_dir), "none"), tiny_tokenizer, rows, settings, tmp_path / "t", lora)


def callback_args() -> tuple[SimpleNamespace, SimpleNamespace]:
    return SimpleNamespace(learning_rate=2e-4), SimpleNamespace(global_step=4, max_steps=10)


@pytest.mark.parametrize("key", ["loss", "train_loss"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_logged_loss_stops_training(key: str, value: float) -> None:
    """A loss that is inf while the gradient stays finite (log p = -inf has a finite gradient) shows in the log."""
    args, state = callback_args()
    with pytest.raises(TrainingDiverged, match=rf"step 4 of 10: the logged {key} is {value}"):
        StopOnNonFinite().on_log(args, state, None, logs={key: value, "grad_norm": 1.0})
    StopOnNonFinite().on_log(args, state, None, logs={key: 1.5})


def test_fp16_loss_scaler_overflow_is_not_divergence() -> None:
    """With fp16 a GradScaler skips steps whose gradients overflow and lowers its scale: that is normal."""
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.full_like(layer.weight, math.inf)
    args, state = callback_args()
    StopOnNonFinite().on_pre_optimizer_step(args, state, None, model=layer, optimizer=SimpleNamespace(scaler=object()))
    with pytest.raises(TrainingDiverged, match=r"step 5 of 10: the gradient norm is inf"):
        StopOnNonFinite().on_pre_optimizer_step(args, state, None, model=layer, optimizer=SimpleNamespace(scaler=None))
