"""The HumanEval code runner holds its limits against programs that misbehave (issue 13, item 4).

Each test is one measured defect of the first runner: a grandchild that left the process group kept
`run_program` waiting (and stayed alive); executed code could read the evaluator's environment through
/proc; and everything a program wrote to stderr was buffered in the evaluator's memory.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mainlib import execution
from mainlib.execution import ExecutionSettings, run_program

REPO = Path(__file__).resolve().parents[2]

# The program's own process forks; the child leaves the process group and session (setsid), says it
# started, and becomes a long sleeper whose command line carries a marker the test can find in /proc.
ESCAPE = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    open({started!r}, "w").close()
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", {marker!r}])
while True:
    time.sleep(1)
"""

# A classic daemon (double fork, setsid, stdio on /dev/null); the program itself exits 0 at once.
DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        open({started!r}, "w").close()
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", {marker!r}])
    os._exit(0)
os.wait()
while not os.path.exists({started!r}):
    time.sleep(0.01)
"""

# Walks up its ancestors and over every visible process, looking for the evaluator's secret.
SNOOP = """
import os, sys
NEEDLE = "secret" + "-123"  # built here, so that no command line carries it

def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""

found, ancestors, pid = [], [], os.getpid()
while pid > 0:
    ancestors.append(pid)
    found += [f"{pid}/{name}" for name in ("environ", "cmdline") if NEEDLE in read(f"/proc/{pid}/{name}")]
    stat = read(f"/proc/{pid}/stat")
    pid = int(stat.rsplit(")", 1)[1].split()[1]) if stat else 0
found += [f"{p}/environ" for p in os.listdir("/proc") if p.isdigit() and NEEDLE in read(f"/proc/{p}/environ")]
with open(REPORT_PATH, "w") as f:  # the test writes the path in
    f.write(repr((ancestors, sorted(set(found)))))
sys.exit(1 if found else 0)
"""

# 200 MiB to stdout, then 200 MiB to stderr.
FLOOD = """
import sys
chunk = "x" * (1 << 20)
for _ in range(200):
    sys.stdout.write(chunk)
sys.stdout.flush()
for _ in range(200):
    sys.stderr.write(chunk)
"""

# The evaluator, in a process of its own: its initial environment (what /proc/<pid>/environ shows) is
# the test's, and its peak memory is its own.
EVALUATOR = """
import json, re, sys
from mainlib.execution import ExecutionSettings, run_program

def peak_kib():  # VmHWM, not ru_maxrss: ru_maxrss starts from the parent's peak (it survives exec)
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

program = open(sys.argv[1]).read()
before = peak_kib()
outcome = run_program(program, ExecutionSettings(**json.loads(sys.argv[2])))
after = peak_kib()
print(json.dumps({"status": outcome.status, "detail": outcome.detail, "peak_growth_kib": after - before}))
"""


@pytest.fixture()
def allowed(monkeypatch):
    monkeypatch.setenv("MAINLIB_ALLOW_CODE_EXECUTION", "1")


def marked(marker: str) -> list[int]:
    """Live processes whose command line carries `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes() if entry.isdigit() else b""
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] if cmdline else b"Z"
        except OSError:
            continue
        if marker.encode() in cmdline and state != b"Z":
            pids.append(int(entry))
    return pids


def survivors(marker: str, grace_s: float = 1.0) -> list[int]:
    """The marked processes still alive after `grace_s`."""
    end = time.monotonic() + grace_s
    while (pids := marked(marker)) and time.monotonic() < end:
        time.sleep(0.05)
    return pids


@pytest.fixture()
def marker():
    """A unique marker; whatever carries it is killed afterwards, so that a failing test leaves nothing behind."""
    value = f"mainlib-test-{uuid.uuid4().hex}"
    yield value
    for pid in marked(value):
        os.kill(pid, signal.SIGKILL)


def without_capabilities() -> None:
    """In the evaluator's process, before exec: an empty capability bounding set, so that even as root it runs
    like an ordinary user's notebook kernel (a capability-less program could not read a root process with
    capabilities anyway, which would hide what the runner itself protects)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in range(64):
        if libc.prctl(ctypes.c_int(24), ctypes.c_ulong(capability), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            break  # PR_CAPBSET_DROP: EINVAL past the last one, EPERM when there is none to drop


def evaluate_elsewhere(program: str, tmp_path: Path, **settings) -> dict:
    """Run `program` through run_program in a fresh evaluator process; its outcome and peak-memory growth."""
    path = tmp_path / "program.py"
    path.write_text(program, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", EVALUATOR, str(path), json.dumps(settings)],
        env=env,
        preexec_fn=without_capabilities,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


ISOLATIONS = pytest.mark.parametrize("isolation", ["auto", "subreaper"])  # "auto" is the PID namespace here


def settings_for(isolation: str, **limits) -> ExecutionSettings:
    return ExecutionSettings(**limits) if isolation == "auto" else ExecutionSettings(isolation=isolation, **limits)


@ISOLATIONS
def test_timeout_holds_against_a_grandchild_that_left_the_session(allowed, tmp_path, marker, isolation) -> None:
    started = tmp_path / "started"
    start = time.perf_counter()
    outcome = run_program(ESCAPE.format(started=str(started), marker=marker), settings_for(isolation, timeout_s=2.0))
    elapsed = time.perf_counter() - start
    assert started.exists()  # the grandchild did escape the process group
    assert outcome.status == "timeout" and elapsed < 2.0 + 2.0, (outcome, elapsed)
    assert not survivors(marker)


@ISOLATIONS
def test_a_daemon_left_behind_by_a_passing_program_is_killed(allowed, tmp_path, marker, isolation) -> None:
    started = tmp_path / "started"
    start = time.perf_counter()
    outcome = run_program(DAEMON.format(started=str(started), marker=marker), settings_for(isolation, timeout_s=5.0))
    assert started.exists() and outcome.passed and time.perf_counter() - start < 5.0, outcome
    assert not survivors(marker)


@ISOLATIONS
def test_executed_code_cannot_read_the_evaluators_secrets(allowed, monkeypatch, tmp_path, isolation) -> None:
    monkeypatch.setenv("HF_TOKEN", "secret-123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-123")
    settings = {} if isolation == "auto" else {"isolation": isolation}
    report = tmp_path / "snoop.txt"
    result = evaluate_elsewhere(SNOOP.replace("REPORT_PATH", repr(str(report))), tmp_path, **settings)
    ancestors, found = ast.literal_eval(report.read_text())
    assert found == [] and result["status"] == "passed", (ancestors, found)
    assert len(ancestors) >= 2  # it did walk up: at least the program and the process that started it


def test_captured_output_is_capped(allowed, tmp_path) -> None:
    result = evaluate_elsewhere(FLOOD, tmp_path)
    assert result["status"] == "failed" and len(result["detail"]) <= 500, result
    assert "file-size limit" in result["detail"], result
    assert result["peak_growth_kib"] < 32 * 1024, result  # the first runner grew by ~2x the output (410 MiB)


def test_a_large_stdout_alone_still_passes(allowed) -> None:
    outcome = run_program("import sys\nfor _ in range(300):\n    sys.stdout.write('x' * (1 << 20))\n")
    assert outcome.passed, outcome


def test_the_strongest_available_isolation_is_used() -> None:
    isolation = execution.available_isolation()
    assert isolation in {"pid-namespace", "subreaper", "process-group"}
    if sys.platform == "linux":
        assert isolation != "process-group"
