"""Running model-written code for HumanEval, without the hub: lm-eval 0.4.13's metric loads `code_eval`
through `evaluate.load`, which needs the network. This is our own replacement.

Each program (prompt + completion + the problem's tests + `check(entry_point)`) runs as `python -I` under a
small launcher process (`mainlib/_exec_launcher.py`), in a fresh temporary directory (its cwd, HOME and TMPDIR)
with an environment of PATH and locale only. What the runner contains:

- time: a wall-clock timeout per program, after which the program and every process it started are killed,
  also those that left its process group or session (setsid, daemons); the leftovers of a program that
  exited on its own are killed too. `run_program` returns within about the timeout plus a second.
- processes and secrets: where the kernel allows unprivileged user namespaces (probed once, see
  `available_isolation`; true on this project's machines), the program runs in new user, PID, mount,
  network and IPC namespaces with a /proc of its own: it sees no process outside (not the evaluator, not the
  user's shell), so it can read no other process's environment or command line, signal none, and has no
  network (it runs as the unmapped uid "nobody" there; what it writes still belongs to the user).
  Otherwise ("subreaper"), the launcher adopts and kills all descendants, and the evaluator is made
  non-dumpable while programs run, so same-uid code cannot read its /proc/<pid>/environ or memory (and
  gdb/py-spy cannot attach meanwhile); its command line and other same-uid processes (the user's shell, the
  Jupyter server) stay readable then.
- resources: address space (`memory_mb`), CPU time, 16 MB per written file, no core dumps; no capabilities
  and no_new_privs (setuid programs such as sudo do not elevate).
- output: stdout goes to /dev/null, stderr to a file capped at 16 MB of which only the last 2 KB are read,
  so the evaluator's memory does not grow with what a program prints.

What it does not contain: the file system (a program can read and write whatever the user can, such as
~/.cache/huggingface/token, ~/.aws/credentials or Jupyter connection files; only file sizes are limited),
the number of processes (a fork bomb runs until the timeout), the network in the "subreaper" fallback, and
kernel exploits. It is not a security sandbox against hostile code, so it only runs after an explicit opt-in
(`allow_code_execution=True`, or `MAINLIB_ALLOW_CODE_EXECUTION=1`).
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import functools
import math
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
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
LAUNCHER = Path(__file__).with_name("_exec_launcher.py")
LAUNCHER_GRACE_S = 10.0  # the launcher's own start, cleanup and report, beyond the program's timeout
Isolation = Literal["auto", "pid-namespace", "subreaper", "process-group"]


class CodeExecutionNotAllowed(RuntimeError):
    """Model-written code was about to run without the user's opt-in."""


@dataclass(frozen=True)
class ExecutionSettings:
    timeout_s: float = 10.0  # wall clock per program
    memory_mb: int = 2048  # address-space limit per program
    workers: int = 2  # programs run at the same time
    isolation: Isolation = "auto"  # "auto": the strongest this machine allows (available_isolation())


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


class _Undumpable:
    """The "subreaper" fallback's protection of the evaluator: without a PID namespace, same-uid code could
    read this process's /proc/<pid>/environ (its initial environment: deleting from os.environ does not
    help) and memory. Non-dumpable while at least one program runs; the previous setting restored after."""

    PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._previous = 1

    def _prctl(self, option: int, value: int = 0) -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0))

    @contextlib.contextmanager
    def during(self, isolation: str) -> Iterator[None]:
        if isolation != "subreaper" or sys.platform != "linux":
            yield
            return
        with self._lock:
            if self._running == 0:
                self._previous = self._prctl(self.PR_GET_DUMPABLE)
                self._prctl(self.PR_SET_DUMPABLE, 0)
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0:
                    self._prctl(self.PR_SET_DUMPABLE, self._previous)


_UNDUMPABLE = _Undumpable()


def _clean_env(tmp: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}


def _stop(launcher: subprocess.Popen) -> None:
    """End a launcher that overran or whose caller was interrupted: SIGTERM lets it kill the program's
    processes (or, in a PID namespace, ends them all); SIGKILL if it does not exit."""
    launcher.terminate()
    try:
        launcher.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()


def _report(output: bytes, returncode: int) -> dict:
    """The launcher's last line, a Python literal. No report is this runner's failure, not the program's: raise."""
    text = output.decode("utf-8", "replace").strip()
    try:
        report = ast.literal_eval(text.splitlines()[-1])
        if isinstance(report, dict) and "status" in report:
            return report
    except (IndexError, SyntaxError, ValueError):
        pass
    raise RuntimeError(f"the code runner's launcher failed (exit {returncode}): {text[-1000:]}") from None


def _launch(program: str, settings: ExecutionSettings, isolation: str) -> dict | None:
    """Run one program through the launcher; its report, or None when the launcher itself overran.

    The launcher's stdout is a pipe that only it holds: the program writes to /dev/null and a file."""
    with tempfile.TemporaryDirectory(prefix="mainlib-exec-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        limits = [repr(float(settings.timeout_s)), str(settings.memory_mb)]
        with subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), isolation, *limits, str(path)],
            cwd=tmp,
            env=_clean_env(tmp),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ) as launcher:
            try:
                output, _ = launcher.communicate(timeout=settings.timeout_s + LAUNCHER_GRACE_S)
            except subprocess.TimeoutExpired:
                _stop(launcher)
                return None
            except BaseException:  # e.g. KeyboardInterrupt in a notebook: leave nothing running
                _stop(launcher)
                raise
    return _report(output, launcher.returncode)


@functools.cache
def available_isolation() -> str:
    """The strongest containment this machine allows, probed once by running an empty program:
    "pid-namespace" (needs unprivileged user namespaces), else "subreaper" (Linux), else "process-group"."""
    if sys.platform != "linux":
        return "process-group"
    try:
        report = _launch("", ExecutionSettings(), "pid-namespace")
    except RuntimeError:  # e.g. unshare: Operation not permitted
        return "subreaper"
    return "pid-namespace" if report and report["returncode"] == 0 else "subreaper"


def _outcome(report: dict | None, settings: ExecutionSettings) -> Outcome:
    if report and not report.get("cleaned", True):
        warnings.warn("a program left processes that could not be killed", RuntimeWarning, stacklevel=3)
    if report is None or report["status"] == "timeout":
        return Outcome("timeout", f"killed after {settings.timeout_s:g} s")
    if report["returncode"] == 0:
        return Outcome("passed", "")
    return Outcome("failed", report["detail"][-500:])


def run_program(program: str, settings: ExecutionSettings | None = None) -> Outcome:
    """Run one Python program under the launcher; passed = it exited 0 within the timeout."""
    require_opt_in()
    settings = settings or ExecutionSettings()
    isolation = available_isolation() if settings.isolation == "auto" else settings.isolation
    with _UNDUMPABLE.during(isolation):
        report = _launch(program, settings, isolation)
    return _outcome(report, settings)


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
