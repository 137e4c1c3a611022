"""Resumable stages: skip when unchanged, rerun downstream on change, redo when killed, keep what was computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mainlib.stages import MANIFEST, Run, RunMismatchError


def pipeline(run: Run, alpha: float, data: str) -> tuple[str, str]:
    """Two chained stages: `a` depends on the data and alpha, `b` on a's output."""

    def compute_a(out: Path) -> dict:
        (out / "a.txt").write_text(f"{data}:{alpha}")
        return {"rows": len(data)}

    a = run.stage("a", {"alpha": alpha}, {"data": data}, compute_a)

    def compute_b(out: Path) -> dict:
        (out / "b.txt").write_text((a.dir / "a.txt").read_text().upper())
        return {}

    b = run.stage("b", {}, {"a": a.fingerprint}, compute_b)
    return (a.dir / "a.txt").read_text(), (b.dir / "b.txt").read_text()


def test_skip_rerun_and_keep(tmp_path: Path) -> None:
    identity = {"model": "tiny"}
    run = Run(tmp_path / "run", identity)
    assert pipeline(run, 0.1, "xy") == ("xy:0.1", "XY:0.1")
    assert run.calls == {"a": 1, "b": 1}
    manifest = json.loads((tmp_path / "run" / "a" / MANIFEST).read_text())
    assert manifest["counts"] == {"rows": 2} and manifest["config"] == {"alpha": 0.1} and "versions" in manifest

    again = Run(tmp_path / "run", identity)
    pipeline(again, 0.1, "xy")
    assert again.calls == {}  # both skipped

    changed = Run(tmp_path / "run", identity)
    assert pipeline(changed, 0.3, "xy") == ("xy:0.3", "XY:0.3")
    assert changed.calls == {"a": 1, "b": 1}  # a changed config reruns a and everything after it
    kept = sorted(p.name for p in (tmp_path / "run" / "_superseded").iterdir())
    assert len(kept) == 2 and (tmp_path / "run" / "_superseded" / kept[0] / "a.txt").read_text() == "xy:0.1"

    new_input = Run(tmp_path / "run", identity)
    pipeline(new_input, 0.3, "xyz")
    assert new_input.calls == {"a": 1, "b": 1}

    forced = Run(tmp_path / "run", identity, force=True)
    pipeline(forced, 0.3, "xyz")
    assert forced.calls == {"a": 1, "b": 1}


def test_killed_stage_is_redone(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", {"model": "tiny"})
    pipeline(run, 0.1, "xy")
    (tmp_path / "run" / "b" / MANIFEST).unlink()  # as if killed before the manifest was written
    (tmp_path / "run" / "b" / "partial.tmp").write_text("half")
    resumed = Run(tmp_path / "run", {"model": "tiny"})
    pipeline(resumed, 0.1, "xy")
    assert resumed.calls == {"b": 1}
    assert not (tmp_path / "run" / "b" / "partial.tmp").exists()


def test_failing_stage_writes_no_manifest(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", {"model": "tiny"})

    def boom(out: Path) -> dict:
        (out / "started").write_text("")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        run.stage("a", {}, {}, boom)
    assert not (tmp_path / "run" / "a" / MANIFEST).exists()


def test_run_of_another_experiment_is_an_error(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", {"model": "tiny", "seed_data": "bundled:seed"})
    pipeline(run, 0.1, "xy")
    with pytest.raises(RunMismatchError, match=r"model: 'tiny' there, 'other' now.*Choose another run_name"):
        Run(tmp_path / "run", {"model": "other", "seed_data": "bundled:seed"})
    assert (tmp_path / "run" / "a" / MANIFEST).is_file()  # nothing deleted
