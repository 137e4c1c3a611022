"""The offline HumanEval metric: canonical solutions pass, wrong ones fail, loops are killed, opt-in is enforced."""

from __future__ import annotations

import time

import pytest

from mainlib.data import bundled_path, load_jsonl
from mainlib.execution import (
    CodeExecutionNotAllowed,
    ExecutionSettings,
    pass_at_k,
    run_program,
    score_samples,
)

PROBLEMS = load_jsonl(bundled_path("eval", "humaneval.jsonl"))[:5]


def reference(problem: dict) -> str:
    """lm-eval's HumanEval target: the tests and the call that runs them."""
    return f"{problem['test']}\ncheck({problem['entry_point']})"


@pytest.fixture()
def allowed(monkeypatch):
    monkeypatch.setenv("MAINLIB_ALLOW_CODE_EXECUTION", "1")


def test_refuses_without_opt_in(monkeypatch) -> None:
    monkeypatch.delenv("MAINLIB_ALLOW_CODE_EXECUTION", raising=False)
    with pytest.raises(CodeExecutionNotAllowed, match="allow_code_execution=True"):
        run_program("print('hi')")
    with pytest.raises(CodeExecutionNotAllowed):
        score_samples(["assert True"], [["pass"]])


def test_canonical_solutions_pass_and_wrong_ones_fail(allowed) -> None:
    references = [reference(p) for p in PROBLEMS]
    canonical = [[p["prompt"] + p["canonical_solution"]] for p in PROBLEMS]
    assert score_samples(references, canonical) == {"pass@1": 1.0}
    wrong = [[p["prompt"] + "    return None\n"] for p in PROBLEMS]
    assert score_samples(references, wrong) == {"pass@1": 0.0}
    mixed = [[c[0], w[0]] for c, w in zip(canonical, wrong, strict=True)]
    assert score_samples(references, mixed, k=(1, 2)) == {"pass@1": 0.5, "pass@2": 1.0}


def test_an_infinite_loop_is_killed(allowed) -> None:
    start = time.perf_counter()
    outcome = run_program("while True:\n    pass\n", ExecutionSettings(timeout_s=1.0))
    assert outcome.status == "timeout" and time.perf_counter() - start < 5


def test_memory_limit_and_clean_environment(allowed, monkeypatch, tmp_path) -> None:
    hog = run_program("x = bytearray(600 * 1024 * 1024)\n", ExecutionSettings(memory_mb=256))
    assert hog.status == "failed" and "MemoryError" in hog.detail
    monkeypatch.setenv("HF_TOKEN", "secret")
    leak = run_program("import os, sys\nsys.exit(1 if 'HF_TOKEN' in os.environ else 0)\n")
    assert leak.passed
    monkeypatch.chdir(tmp_path)
    stray = run_program("open('stray.txt', 'w').write('x')\n")
    assert stray.passed and not list(tmp_path.iterdir())  # it wrote into its own temporary directory


def test_pass_at_k_estimator() -> None:
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 − C(4,2)/C(5,2)
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(2, 1, 5)
