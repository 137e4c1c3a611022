"""The process between the evaluator (`mainlib.execution`) and one model-written program.

Run as `python -I -S _exec_launcher.py ISOLATION TIMEOUT_S MEMORY_MB PROGRAM`, with a clean environment and
the program's temporary directory as cwd. It starts the program with its limits, waits at most TIMEOUT_S,
kills the program and every process it left (also after a normal exit), and writes one line to stdout, a
Python literal: {"isolation": ..., "status": "exit" | "timeout", "returncode": int | None, "detail": the end
of stderr, "cleaned": bool}.

Why a separate process: unshare(CLONE_NEWUSER) needs a single-threaded caller, and the evaluator (a notebook
kernel, a thread pool) must not become a subreaper or the init of a namespace itself. It imports only a few
cheap standard modules (not subprocess, tempfile or json): it starts once per program. ISOLATION is one of
  pid-namespace  new user, PID, mount, network and IPC namespaces; the supervisor is their pid 1 with its own
                 /proc: the program sees no process outside, and when pid 1 exits the kernel kills the rest;
  subreaper      PR_SET_CHILD_SUBREAPER: orphaned descendants re-parent to the supervisor, which kills them;
  process-group  (not Linux) only the program's process group is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
import select
import signal
import sys
import time

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 36, 38
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # bytes any file the program writes may reach, its stderr included
DETAIL_BYTES = 2000  # how much of the end of stderr comes back
KILL_DEADLINE_S = 5.0  # how long to keep killing descendants that are still alive
LIBC = ctypes.CDLL(None, use_errno=True)


def _libc(name: str, *args: object) -> None:
    """Call a libc function that returns 0 on success; raise OSError on failure."""
    if getattr(LIBC, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _prctl(option: int, value: int) -> None:
    _libc("prctl", ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def _enter_pid_namespace() -> None:
    """unshare and fork: only the child returns, as pid 1 of the new namespaces, with a /proc of its own.

    The uid stays unmapped in the new user namespace, so the program (after exec) holds no capability there
    and cannot unmount this /proc to see the host's. The outer process only waits and exits the same way."""
    _libc("unshare", CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC)
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the outer process killed: the whole namespace goes
    _libc("mount", None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None)
    _libc("mount", b"proc", b"/proc", b"proc", ctypes.c_ulong(MS_NOSUID | MS_NODEV | MS_NOEXEC), None)


def _restrict(memory_mb: int, timeout_s: float) -> None:
    """In the program's process, before exec: resource limits, no capabilities, no privilege gain."""
    memory = memory_mb * 1024 * 1024
    cpu = math.ceil(timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform != "linux":
        return
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    for capability in range(64):  # an empty bounding set: even uid 0 gets no capability at exec
        try:
            _prctl(PR_CAPBSET_DROP, capability)
        except OSError:  # EINVAL past the last capability; EPERM when there were none to drop
            break


def _spawn(program: str, memory_mb: int, timeout_s: float, stderr: int) -> int:
    """fork + exec `python -I PROGRAM` in a new session: stdin and stdout /dev/null, stderr the given file."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd, target in ((0, null), (1, null), (2, stderr)):
            os.dup2(target, fd)
        os.closerange(3, 65536)
        for number in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):  # what Python or this launcher ignored
            signal.signal(number, signal.SIG_DFL)
        _restrict(memory_mb, timeout_s)
        os.execv(sys.executable, [sys.executable, "-I", program])
    except BaseException as error:
        os.write(2, f"the launcher could not start the program: {error!r}\n".encode())
    os._exit(127)


def _wait(pid: int, timeout_s: float) -> int | None:
    """The program's return code (-N: killed by signal N), or None at the timeout; a pidfd wakes us at once."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll
        pidfd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is None:
                time.sleep(min(left, 0.01))
            else:
                select.select([pidfd], [], [], left)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _live_descendants(root: int) -> list[int]:
    """Every live process below `root`, from the ppid links in /proc (zombies are dead already)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
        except OSError:  # gone meanwhile
            continue
        if state not in (b"Z", b"X"):
            children.setdefault(int(ppid), []).append(int(entry))
    found, stack = [], [root]
    while stack:
        below = children.get(stack.pop(), [])
        found += below
        stack += below
    return found


def _signal(pid: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)


def _reap() -> None:
    """Collect every child that has exited (orphans re-parented to us included)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _kill_all(program: int, isolation: str) -> bool:
    """SIGKILL the program and everything below this process, until none is alive; False past the deadline."""
    if isolation == "process-group":
        _signal(program, group=True)
        _reap()
        return True
    deadline = time.monotonic() + KILL_DEADLINE_S
    while pids := _live_descendants(os.getpid()):
        for pid in pids:
            _signal(pid)
        _reap()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    _reap()
    return True


def _stderr_file() -> int:
    """An unnamed file in the cwd for the program's stderr: no pipe a grandchild could hold open."""
    try:
        return os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):  # no O_TMPFILE: create, then unlink
        fd = os.open(f".stderr-{os.getpid()}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.unlink(f".stderr-{os.getpid()}")
        return fd


def _tail(stderr: int, returncode: int | None) -> str:
    """The last DETAIL_BYTES of the program's stderr (read from the end: its size does not matter here)."""
    size = os.fstat(stderr).st_size
    data = os.pread(stderr, DETAIL_BYTES, max(0, size - DETAIL_BYTES)).decode("utf-8", "replace")
    if size >= FILE_SIZE_LIMIT:
        data += f"\n[stderr reached the {FILE_SIZE_LIMIT >> 20} MB file-size limit]"
    if returncode is not None and returncode < 0:
        data += f"\n[killed by {signal.Signals(-returncode).name}]"
    return data


def _supervise(isolation: str, timeout_s: float, memory_mb: int, program: str) -> dict:
    """Run the program to its exit or the timeout, then kill whatever is left; the report for the evaluator."""
    stderr = _stderr_file()
    pid = _spawn(program, memory_mb, timeout_s, stderr)
    returncode = None
    try:
        returncode = _wait(pid, timeout_s)
    finally:
        cleaned = _kill_all(pid, isolation)
    status = "timeout" if returncode is None else "exit"
    detail = _tail(stderr, returncode)
    return {"isolation": isolation, "status": status, "returncode": returncode, "detail": detail, "cleaned": cleaned}


def _terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the cleanup must not be interrupted again
    raise SystemExit(f"terminated by signal {signum}")  # unwinds through _supervise's cleanup


def main(argv: list[str]) -> None:
    isolation, timeout_s, memory_mb, program = argv[1], float(argv[2]), int(argv[3]), argv[4]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the evaluator ends this process
    if sys.platform == "linux":
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the evaluator gone: so is this process
        _prctl(PR_SET_DUMPABLE, 0)  # the program cannot open /proc/<this>/fd/1 (the report's pipe) or read memory
    if isolation == "pid-namespace":
        _enter_pid_namespace()
    elif isolation == "subreaper":
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        signal.signal(signal.SIGTERM, _terminated)
    elif isolation != "process-group":
        raise SystemExit(f"unknown isolation {isolation!r}")
    report = _supervise(isolation, timeout_s, memory_mb, program)
    sys.stdout.write(repr(report) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv)
