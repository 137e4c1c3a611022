"""Evaluation: the offline lm-eval task twins, their metrics on known answers, the CLI = the function."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from mainlib import benchmarks
from mainlib.evaluate import evaluate, main
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
        evaluate("any-model", tasks=["humaneval"])


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
