"""Running model-written code for HumanEval, without the hub: lm-eval 0.4.13's metric loads `code_eval`
through `evaluate.load`, which needs the network. This is our own replacement.

Each program (prompt + completion + the problem's tests + `check(entry_point)`) runs in its own Python
subprocess: isolated mode (`-I`), a fresh temporary directory as cwd and HOME, an environment holding
nothing but PATH and locale (no tokens or keys), a wall-clock timeout that kills the whole process group,
and `resource` limits on memory, file size, core dumps and CPU time. This limits accidents (infinite
loops, memory blow-ups, stray files); it is not a security sandbox against hostile code, so it only runs
after an explicit opt-in (`allow_code_execution=True`, or `MAINLIB_ALLOW_CODE_EXECUTION=1`).
"""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

OPT_IN_VARIABLE = "MAINLIB_ALLOW_CODE_EXECUTION"
OPT_IN_MESSAGE = (
    "HumanEval runs code written by the model on this machine. Opt in with evaluate(..., "
    "allow_code_execution=True), `python -m mainlib.evaluate --allow-code-execution`, or "
    f"{OPT_IN_VARIABLE}=1 (each program runs in a subprocess with a timeout and memory limit, "
    "which is not a security sandbox)."
)


class CodeExecutionNotAllowed(RuntimeError):
    """Model-written code was about to run without the user's opt-in."""


@dataclass(frozen=True)
class ExecutionSettings:
    timeout_s: float = 10.0  # wall clock per program
    memory_mb: int = 2048  # address-space limit per program
    workers: int = 2  # programs run at the same time


@dataclass(frozen=True)
class Outcome:
    status: Literal["passed", "failed", "timeout"]
    detail: str  # the end of stderr, for a failed program

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def execution_allowed() -> bool:
    return os.environ.get(OPT_IN_VARIABLE, "") == "1"


def require_opt_in() -> None:
    if not execution_allowed():
        raise CodeExecutionNotAllowed(OPT_IN_MESSAGE)


def _limits(settings: ExecutionSettings):
    memory = settings.memory_mb * 1024 * 1024
    cpu = math.ceil(settings.timeout_s) + 1

    def apply() -> None:  # runs in the child, before Python starts
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, settings: ExecutionSettings | None = None) -> Outcome:
    """Run one Python program in a limited subprocess; passed = it exited 0 within the timeout."""
    require_opt_in()
    settings = settings or ExecutionSettings()
    with tempfile.TemporaryDirectory(prefix="mainlib-exec-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        process = subprocess.Popen(
            [sys.executable, "-I", str(path)],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_limits(settings),
            start_new_session=True,  # its own process group: a timeout kills any children too
        )
        try:
            _, stderr = process.communicate(timeout=settings.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return Outcome("timeout", f"killed after {settings.timeout_s:g} s")
    if process.returncode == 0:
        return Outcome("passed", "")
    return Outcome("failed", stderr.decode("utf-8", "replace")[-500:])


def humaneval_program(completion_with_prompt: str, test_and_check: str) -> str:
    """The program lm-eval's HumanEval builds: the function (prompt + completion), its tests, `check(...)`."""
    return f"{completion_with_prompt}\n\n{test_and_check}\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al., 2021): 1 − C(n−c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem; got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_samples(
    references: Sequence[str],
    predictions: Sequence[Sequence[str]],
    k: Sequence[int] = (1,),
    settings: ExecutionSettings | None = None,
) -> dict[str, float]:
    """Mean pass@k over problems; `predictions[i]` are the samples (prompt + completion) for `references[i]`."""
    require_opt_in()
    settings = settings or ExecutionSettings()
    jobs = [
        (i, humaneval_program(p, ref))
        for i, (ref, samples) in enumerate(zip(references, predictions, strict=True))
        for p in samples
    ]
    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        outcomes = list(pool.map(lambda job: run_program(job[1], settings), jobs))
    passed = [0] * len(references)
    for (i, _), outcome in zip(jobs, outcomes, strict=True):
        passed[i] += outcome.passed
    return {
        f"pass@{kk}": sum(pass_at_k(len(s), c, kk) for s, c in zip(predictions, passed, strict=True)) / len(references)
        for kk in k
    }
