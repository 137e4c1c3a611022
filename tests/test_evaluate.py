"""Evaluation: the offline lm-eval task twins, their metrics on known answers, the CLI = the function."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from mainlib import benchmarks, models
from mainlib.evaluate import (
    EvalSettings,
    _label,
    bootstrap_stderr,
    compare,
    evaluate,
    headline_table,
    main,
    parse_adapters,
)
from mainlib.execution import CodeExecutionNotAllowed
from mainlib.tasks import TASKS_DIR


@pytest.mark.slow
def test_offline_tasks_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = evaluate(
        str(tiny_model_dir),
        tasks=["mmlu", "gsm8k", "ifeval"],
        limit=3,
        batch_size=4,
        data="bundled",
        run_name="t",
        results_dir=tmp_path,
        quantization="none",
        max_gen_toks=8,
    )
    headline = {r["benchmark"]: r for r in rows if r["headline"]}
    assert set(headline) == {"mmlu", "gsm8k", "ifeval"}
    assert headline["mmlu"]["task"] == "mainlib_mmlu_bundled" and headline["mmlu"]["n"] == 4 * 3  # 4 subjects
    assert headline["gsm8k"]["n"] == 3 and headline["ifeval"]["n"] == 3
    for row in rows:
        assert 0.0 <= row["value"] <= 1.0, row
    record = json.loads((tmp_path / "t" / "eval" / f"{tiny_model_dir.name}__gsm8k.json").read_text())
    assert record["settings"]["limit"] == 3 and record["lm_eval"]["n-shot"]["mainlib_gsm8k"] == 5
    assert {r["filter"] for r in record["summary"]} == {"strict-match", "flexible-extract"}
    # the tiny tokenizer has a chat template: "auto" uses it, few-shot examples as turns; the cap is recorded
    assert record["settings"]["apply_chat_template"] is True and record["settings"]["fewshot_as_multiturn"] is True
    assert record["lm_eval"]["configs"]["mainlib_gsm8k"]["fewshot_config"] is not None
    assert str(Path(__file__).resolve().parents[1]) not in json.dumps(record["lm_eval"])  # no machine paths
    assert record["responses"]["mainlib_gsm8k"]["n"] == 3 and record["responses"]["mainlib_gsm8k"]["cap"] == 8
    columns = list(headline_table(rows)[0])
    assert "gsm8k (exact_match, n=3, chat template, capped at 8 tokens)" in columns
    assert "mmlu (acc, n=12, chat template)" in columns  # loglikelihood: no generation, no cap
    ifeval_rows = {r["metric"]: r for r in rows if r["benchmark"] == "ifeval"}
    assert ifeval_rows["inst_level_loose_acc"]["stderr"] is not None  # lm-eval gives none: bootstrap over prompts


class CannedLM(LM):
    """Answers every generation request with a fixed function of its prompt (no model)."""

    def __init__(self, answer) -> None:
        super().__init__()
        self.answer = answer

    def generate_until(self, requests):
        return [self.answer(r.args[0]) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def humaneval_pass_at_1(answer) -> float:
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"mainlib_source": "bundled"})
    out = simple_evaluate(
        model=CannedLM(answer), tasks=["mainlib_humaneval"], limit=5, task_manager=manager, confirm_run_unsafe_code=True
    )
    return out["results"]["mainlib_humaneval"]["pass@1,create_test"]


def test_humaneval_task_scores_known_answers(monkeypatch) -> None:
    monkeypatch.setenv("MAINLIB_ALLOW_CODE_EXECUTION", "1")
    solutions = {p["prompt"]: p["canonical_solution"] for p in benchmarks.humaneval("bundled")["test"]}
    assert humaneval_pass_at_1(lambda prompt: solutions[prompt]) == 1.0
    assert humaneval_pass_at_1(lambda prompt: "    return None\n") == 0.0


def test_humaneval_needs_the_opt_in(monkeypatch) -> None:
    monkeypatch.delenv("MAINLIB_ALLOW_CODE_EXECUTION", raising=False)
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_execution=True"):
        evaluate("org/any-model", tasks=["humaneval"])


def ifeval_doc(key: int) -> dict:
    return next(d for d in benchmarks.ifeval("bundled")["train"] if d["key"] == key)


@pytest.mark.parametrize(
    ("key", "response", "strict", "loose"),
    [
        (1361, "the rent is high\nand the pay is low", True, True),  # all lowercase
        (1361, "The rent is high", False, False),
        (2441, '"Vote in every election, because it matters."', True, True),  # wrapped in double quotes
        (2441, 'Sure, here it is:\n"Vote in every election."', False, True),  # loose drops the first line
        (2328, "Bury a box of memories for the year 2050.", True, True),  # forbidden words absent
        (2328, "Our startup sells memories.", False, False),
    ],
)
def test_ifeval_metric_on_hand_written_responses(key: int, response: str, strict: bool, loose: bool) -> None:
    from mainlib.tasks.utils import ifeval_process_results

    result = ifeval_process_results(ifeval_doc(key), [response])
    assert result["prompt_level_strict_acc"] is strict
    assert result["prompt_level_loose_acc"] is loose


@pytest.mark.slow
def test_cli_gives_the_same_numbers(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    common = dict(limit=2, batch_size=2, data="bundled", quantization="none", max_gen_toks=8)
    rows = evaluate(str(tiny_model_dir), tasks=["gsm8k"], run_name="fn", results_dir=tmp_path, **common)
    args = ["--model", str(tiny_model_dir), "--tasks", "gsm8k", "--limit", "2", "--batch-size", "2", "--data"]
    args += [
        "bundled",
        "--quantization",
        "none",
        "--max-gen-toks",
        "8",
        "--run-name",
        "cli",
        "--results-dir",
        str(tmp_path),
    ]
    main(args)
    cli = json.loads((tmp_path / "cli" / "eval" / f"{tiny_model_dir.name}__gsm8k.json").read_text())["summary"]
    assert [(r["metric"], r["filter"], r["value"]) for r in cli] == [
        (r["metric"], r["filter"], r["value"]) for r in rows
    ]
    assert "exact_match" in capsys.readouterr().out


@pytest.mark.skipif(not os.environ.get("MAINLIB_DATA_DIR"), reason="needs the full datasets ($MAINLIB_DATA_DIR)")
def test_full_sets_have_their_published_sizes() -> None:
    assert len(benchmarks.gsm8k("full")["test"]) == 1319
    subjects = benchmarks.mmlu_subjects("full")
    assert len(subjects) == 57
    assert sum(len(benchmarks.mmlu(s, "full")["test"]) for s in subjects) == 14042
    assert len(benchmarks.humaneval("full")["test"]) == 164
    assert len(benchmarks.ifeval("full")["train"]) == 541


def test_bundled_sets_and_bad_input(tmp_path: Path, monkeypatch) -> None:
    assert len(benchmarks.gsm8k("bundled")["train"]) == 20
    assert benchmarks.mmlu("astronomy", "bundled")["test"][0]["answer"] in range(4)
    with pytest.raises(FileNotFoundError, match="the bundled pack has astronomy"):
        benchmarks.mmlu("anatomy", "bundled")
    bad = tmp_path / "mmlu" / "test"
    bad.mkdir(parents=True)
    (tmp_path / "mmlu" / "dev").mkdir()
    (bad / "x_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nQ,a,b,c,d,B\n")
    (tmp_path / "mmlu" / "dev" / "x_dev.csv").write_text("question,choice0,choice1,choice2,choice3,answer\n")
    monkeypatch.setenv("MAINLIB_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"x_test.csv:2: field 'answer' must be 0-3"):
        benchmarks.mmlu("x", "full")


def test_task_names_per_data_source(monkeypatch) -> None:
    import torch

    from mainlib.evaluate import default_data, task_name

    assert [task_name(b, "hub") for b in ("mmlu", "gsm8k", "humaneval", "ifeval")] == [
        "mmlu",
        "gsm8k",
        "humaneval",
        "ifeval",
    ]
    assert task_name("mmlu", "full") == "mainlib_mmlu" and task_name("mmlu", "bundled") == "mainlib_mmlu_bundled"
    assert task_name("arc_easy", "hub") == "arc_easy"  # any other lm-eval task passes through
    with pytest.raises(ValueError, match="data must be one of"):
        task_name("mmlu", "local")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_data() == "bundled"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_data() == "hub"


# --------------------------------------------------------------------------------------------------
# The adapter is what is scored; one base load gives what separate loads give
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two LoRA adapters on the tiny model with deliberately large, different B matrices."""
    import torch

    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    out = {}
    for k, name in enumerate(("A", "B")):
        torch.manual_seed(k)
        peft_model = models.add_lora(models.load_model(str(tiny_model_dir), "none"), models.LoraSettings(r=4))
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 2.0)
        folder = tmp_path_factory.mktemp(f"adapter_{name}")
        models.save_adapter(peft_model, tokenizer, folder, {"base_model": str(tiny_model_dir)})
        out[name] = str(folder)
    return out


def read_samples(folder: Path) -> dict[str, list[dict]]:
    """samples_dir's JSONL files by file stem (label__benchmark)."""
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(folder.glob("*.jsonl"))}


EVAL = dict(limit=2, batch_size=2, data="bundled", quantization="none", max_gen_toks=8)


@pytest.mark.slow
def test_the_adapter_changes_what_is_scored(tiny_model_dir: Path, big_adapters: dict, tmp_path: Path) -> None:
    adapters = {"base": None, "A": big_adapters["A"]}
    compare(str(tiny_model_dir), adapters, ["mmlu", "ifeval"], samples_dir=str(tmp_path), results_dir=tmp_path, **EVAL)
    samples = read_samples(tmp_path)
    names = (tiny_model_dir.name, _label("", big_adapters["A"]))
    base, tuned = (samples[f"{name}__mmlu"] for name in names)
    assert len(base) == len(tuned) == 8  # 4 subjects x 2 documents
    for b, t in zip(base, tuned, strict=True):
        assert (b["task"], b["doc_id"]) == (t["task"], t["doc_id"])
        for choice_base, choice_tuned in zip(b["resps"], t["resps"], strict=True):  # [[loglikelihood, greedy]]
            assert abs(choice_base[0][0] - choice_tuned[0][0]) > 1e-3
    responses = [[s["resps"][0][0] for s in samples[f"{name}__ifeval"]] for name in names]
    assert responses[0] != responses[1]


@pytest.mark.slow
def test_one_call_gives_what_separate_calls_give(tiny_model_dir: Path, big_adapters: dict, tmp_path: Path) -> None:
    adapters = {"base": None, "A": big_adapters["A"], "B": big_adapters["B"]}
    here = dict(EVAL, results_dir=str(tmp_path / "results"))
    together = compare(str(tiny_model_dir), adapters, ["mmlu", "gsm8k"], samples_dir=str(tmp_path / "one"), **here)
    apart = []
    for label, adapter in adapters.items():
        apart += compare(
            str(tiny_model_dir), {label: adapter}, ["mmlu", "gsm8k"], samples_dir=str(tmp_path / label), **here
        )
    key = ("label", "task", "metric", "filter", "value", "stderr", "n")
    assert [tuple(r[k] for k in key) for r in together] == [tuple(r[k] for k in key) for r in apart]
    one = read_samples(tmp_path / "one")
    separate = {stem: rows for label in adapters for stem, rows in read_samples(tmp_path / label).items()}
    assert one == separate and len(one) == 6
    scores = {stem: [s["resps"] for s in rows] for stem, rows in one.items() if stem.endswith("__mmlu")}
    assert len({json.dumps(v) for v in scores.values()}) == 3  # base, A and B all score differently


# --------------------------------------------------------------------------------------------------
# Errors before any model is loaded
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize(
    ("model", "adapters", "tasks", "error", "message"),
    [
        ("smollm2-135m-instruc", {"base": None}, ["mmlu"], ValueError, r"Did you mean 'smollm2-135m-instruct'"),
        ("TINY", {"x": "/no/such/adapter"}, ["mmlu"], FileNotFoundError, r"/no/such/adapter: no such folder"),
        (
            "TINY",
            {"base": None},
            ["ifevl"],
            ValueError,
            r"unknown task 'ifevl'.*mmlu, mmlu_cloze, gsm8k, humaneval, ifeval",
        ),
        ("TINY", {}, ["mmlu"], ValueError, r"adapters is empty"),
    ],
)
def test_bad_input_fails_before_the_model_loads(
    tiny_model_dir: Path, no_model_loading, model, adapters, tasks, error, message
) -> None:
    model = str(tiny_model_dir) if model == "TINY" else model
    with pytest.raises(error, match=message):
        compare(model, adapters, tasks, data="bundled")


def test_adapter_of_another_model_and_bad_settings(tiny_model_dir: Path, big_adapters: dict, no_model_loading) -> None:
    with pytest.raises(ValueError, match=r"was trained on .* not on 'smollm2-135m-instruct'"):
        compare("smollm2-135m-instruct", {"A": big_adapters["A"]}, ["mmlu"], data="bundled")
    with pytest.raises(FileNotFoundError, match="not saved by mainlib"):
        compare(str(tiny_model_dir), {"x": str(tiny_model_dir)}, ["mmlu"], data="bundled")
    for bad, message in [
        (dict(apply_chat_template="yes"), "apply_chat_template must be one of 'auto', True, False"),
        (dict(limit=0), "limit must be"),
        (dict(data="local"), "data must be one of"),
        (dict(batch_size=0), "batch_size must be"),
        (dict(max_gen_tokens=8), "unexpected keyword argument 'max_gen_tokens'"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            compare(str(tiny_model_dir), {"base": None}, ["mmlu"], **bad)
    assert EvalSettings().apply_chat_template == "auto" and EvalSettings().max_gen_toks is None


def test_chat_template_forced_without_one(tiny_model_dir: Path) -> None:
    from mainlib.evaluate import uses_chat_template

    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    assert uses_chat_template(tokenizer, "auto") is True and uses_chat_template(tokenizer, False) is False
    tokenizer.chat_template = None
    assert uses_chat_template(tokenizer, "auto") is False
    with pytest.raises(ValueError, match="has no chat template"):
        uses_chat_template(tokenizer, True)


def test_bootstrap_stderr_resamples_documents() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    flat = [bool(x) for x in rng.random(400) < 0.3]
    assert bootstrap_stderr(flat) == pytest.approx(np.sqrt(0.3 * 0.7 / 400), rel=0.15)
    # 100 documents of 4 instructions each, all-or-nothing: the clustered error is twice the naive one
    clustered = [[x] * 4 for x in flat[:100]]
    p = np.mean(flat[:100])
    assert bootstrap_stderr(clustered) == pytest.approx(np.sqrt(p * (1 - p) / 100), rel=0.15)
    assert bootstrap_stderr([True]) is None


def test_cli_adapters() -> None:
    assert parse_adapters(None, False, "m") == {"base": None}
    assert parse_adapters(["MAIN=runs/a/forward"], True, "m") == {"base": None, "MAIN": "runs/a/forward"}
    assert parse_adapters(["runs/a/forward"], False, "m") == {"runs_a_forward": "runs/a/forward"}


def test_auto_batch_size_is_fixed_on_cpu() -> None:
    """On CPU lm-eval's probe ends in the OOM killer, not an exception: "auto" is a fixed size there."""
    import torch

    from mainlib.evaluate import CPU_AUTO_BATCH_SIZE, resolve_batch_size

    assert resolve_batch_size("auto", torch.device("cpu")) == CPU_AUTO_BATCH_SIZE
    assert resolve_batch_size(4, torch.device("cpu")) == 4
    assert resolve_batch_size("auto", torch.device("cuda", 0)) == "auto"
