"""One process per run directory, kills at random points, read-only runs, and nothing moved aside for a bad config.

Every test here runs the tiny MAIN pipeline (tests/conftest.py `main_config`), some of it in child processes
that are killed with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mainlib.config import MainConfig
from mainlib.parameters import ConfigError
from mainlib.pipeline import run_main
from mainlib.stages import LOCK, SUPERSEDED, RunLock, RunLocked, RunReadOnly

REPO = Path(__file__).resolve().parents[2]
VOLATILE = {"manifest.json", "attempt.json", "run.json", LOCK}  # times, pids: the rest must be identical


def run_pickled(config_file: str, until: str) -> None:
    """Child process: the pipeline for a pickled config."""
    run_main(pickle.loads(Path(config_file).read_bytes()), until=until)


def start_child(config: MainConfig, tmp_path: Path, until: str = "final_sft") -> subprocess.Popen:
    config_file = tmp_path / f"{config.run_name}.pkl"
    config_file.write_bytes(pickle.dumps(config))
    code = f"from tests.reliability.test_run_directory import run_pickled; run_pickled({str(config_file)!r}, {until!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def without_seconds(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    return [without_seconds(v) for v in value] if isinstance(value, list) else value


def outputs(run_dir: Path) -> dict[str, Any]:
    """Every output file of the run's stages by relative path: bytes, or for JSON its content without the
    `seconds` timings (superseded and bookkeeping files left out)."""
    files = [
        p for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name not in VOLATILE and SUPERSEDED not in p.parts
    ]
    read = {".json": lambda p: without_seconds(json.loads(p.read_text()))}
    return {str(p.relative_to(run_dir)): read.get(p.suffix, Path.read_bytes)(p) for p in files}


def wait_for_lock(run_dir: Path, child: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if (run_dir / LOCK).is_file() and (holder := (run_dir / LOCK).read_text()):
            return holder
        time.sleep(0.05)
    raise AssertionError(f"the child never held the lock: {child.stderr.read().decode()[-2000:]}")


@pytest.mark.slow
def test_kill_at_random_points_then_resume_gives_the_same_outputs(main_config: MainConfig, tmp_path: Path) -> None:
    """SIGKILL at three random moments of the pipeline up to `score` (data, training and sharded stages); each
    resume ends in the outputs of the uninterrupted run."""
    main_config.shard_size = 2  # the 4 pool responses: 2 shards per sharded stage
    start = time.monotonic()
    reference = start_child(main_config, tmp_path, until="score")
    assert reference.wait(timeout=900) == 0, reference.stderr.read().decode()[-3000:]
    seconds = time.monotonic() - start
    expected = outputs(Path(main_config.runs_dir) / main_config.run_name)
    assert any(name.endswith("adapter_model.safetensors") for name in expected)
    for seed in (1, 2, 3):
        killed = dataclasses.replace(main_config, run_name=f"killed_{seed}")
        child = start_child(killed, tmp_path, until="score")
        time.sleep(random.Random(seed).uniform(0.15, 0.85) * seconds)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) in (0, -signal.SIGKILL)
        run_main(killed, until="score")
        got = outputs(Path(main_config.runs_dir) / killed.run_name)
        assert sorted(got) == sorted(expected), f"seed {seed}"
        assert [name for name in expected if got[name] != expected[name]] == [], f"seed {seed}"


@pytest.mark.slow
def test_a_second_process_fails_at_once_and_a_dead_holder_is_taken_over(
    main_config: MainConfig, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = Path(main_config.runs_dir) / main_config.run_name
    child = start_child(main_config, tmp_path, until="init_sft")
    holder = wait_for_lock(run_dir, child)
    assert f"pid {child.pid} " in holder and "host" in holder and "started" in holder
    started = time.monotonic()
    with pytest.raises(RunLocked, match=rf"{run_dir} is in use by another process \(pid {child.pid} on host"):
        run_main(main_config)
    assert time.monotonic() - started < 30  # at once: validation and the tokenizer, no model, no stage
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert (run_dir / LOCK).read_text() == holder  # the dead process's claim is still written there
    run_main(main_config, until="init_sft")
    assert f"taking over the lock of a process that is gone (pid {child.pid} " in capsys.readouterr().out
    assert (run_dir / LOCK).read_text() == ""  # released cleanly
    assert (run_dir / "init_sft" / "manifest.json").is_file()


def test_one_process_cannot_take_its_own_run_twice(tmp_path: Path) -> None:
    """The lock is per open file: two runs on one directory in one process (threads, a notebook) exclude too."""
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLocked, match="in use by another process"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_a_bad_config_moves_nothing_and_the_old_config_restores(
    main_config: MainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mainlib import pipeline

    run_dir = Path(main_config.runs_dir) / main_config.run_name
    run_main(main_config)
    finished = outputs(run_dir)
    main_config.main.final_alpha = 2.0
    with pytest.raises(ConfigError, match=r"final_alpha \(main\.final_alpha\): got 2\.0; allowed"):
        run_main(main_config)
    assert outputs(run_dir) == finished and not (run_dir / "_superseded").exists()

    def failing_final_sft(ctx):  # a valid config whose stage fails half way (a crash, a diverged loss)
        raise RuntimeError("final SFT failed")

    main_config.main.final_alpha = 0.3
    monkeypatch.setattr(pipeline, "final_sft", failing_final_sft)
    with pytest.raises(RuntimeError, match="final SFT failed"):
        run_main(main_config)
    assert not (run_dir / "final_sft" / "manifest.json").exists()
    monkeypatch.undo()
    main_config.main.final_alpha = 0.5  # the old config back: restored from _superseded/, not recomputed
    assert run_main(main_config).ran == [] and outputs(run_dir) == finished


def test_a_finished_run_opens_without_writing(main_config: MainConfig) -> None:
    run_dir = Path(main_config.runs_dir) / main_config.run_name
    run_main(main_config, until="round_0")
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*") if p.name != LOCK}
    state = run_main(main_config, until="round_0")
    assert state.ran == [] and state.sft["round_0_reverse"]["losses"]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run_dir.rglob("*") if p.name != LOCK} == before


def test_read_only_storage_opens_a_finished_run_and_names_an_unfinished_stage(
    main_config: MainConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_main(main_config, until="round_0")

    def read_only(self) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self.path))

    monkeypatch.setattr(RunLock, "acquire", read_only)
    assert run_main(main_config, until="round_0").ran == []
    with pytest.raises(RunReadOnly, match=r"cannot be written \(Read-only file system\) and stage 'synthesize'"):
        run_main(main_config)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_a_finished_run_on_a_read_only_mount(main_config: MainConfig, tmp_path: Path) -> None:
    """The same on a real read-only bind mount, in a private mount namespace (needs the right to mount)."""
    runs = Path(main_config.runs_dir)
    run_main(main_config, until="round_0")
    config_file = tmp_path / "config.pkl"
    config_file.write_bytes(pickle.dumps(main_config))
    code = f"from tests.reliability.test_run_directory import run_pickled; run_pickled({str(config_file)!r}, 'round_0')"
    mount = f"mount --bind {runs} {runs} && mount -o remount,bind,ro {runs} && touch {runs}/x"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()[:200]}")
    script = f'mount --bind {runs} {runs} && mount -o remount,bind,ro {runs} && {sys.executable} -c "{code}"'
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
