"""Resumable stages: each stage writes its outputs under `runs/<run_name>/<stage>/`, then, last and atomically,
a `manifest.json` with its config, the fingerprints of its inputs, package versions, counts and timings.

- Re-running skips a stage whose manifest matches (same config, same inputs).
- A changed config or input reruns it; since a stage's fingerprint is an input of the stages after it,
  they rerun too. The outputs it replaces are moved to `_superseded/`, never deleted.
- A stage killed midway has no manifest and is redone from scratch.
- `force=True` reruns every stage.
- A run directory made for another model or data (`run.json`) is an error that says what to change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mainlib.results import package_versions, write_json

MANIFEST = "manifest.json"


class RunMismatchError(ValueError):
    """The run directory belongs to another experiment."""


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able values (configs, input fingerprints, data)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    dir: Path
    skipped: bool
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


class Run:
    """A run directory and its stages. `identity` (base model, data) is fixed for the life of the directory."""

    def __init__(self, run_dir: str | Path, identity: dict[str, Any], force: bool = False) -> None:
        self.dir = Path(run_dir)
        self.force = force
        self.calls: dict[str, int] = {}  # how often each stage really ran in this process (tests read it)
        self.dir.mkdir(parents=True, exist_ok=True)
        run_file = self.dir / "run.json"
        if run_file.is_file():
            recorded = json.loads(run_file.read_text())["identity"]
            changed = {k: (recorded.get(k), v) for k, v in identity.items() if recorded.get(k) != v}
            if changed and not force:
                what = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in changed.items())
                raise RunMismatchError(
                    f"{self.dir} was made for a different experiment ({what}). Choose another run_name, or pass "
                    "force=True to recompute in it (its current outputs are kept under _superseded/)."
                )
        write_json(run_file, {"identity": identity})

    def stage(
        self,
        name: str,
        config: dict[str, Any],
        inputs: dict[str, str],
        compute: Callable[[Path], dict[str, Any]],
    ) -> StageResult:
        """Run `compute(stage_dir)` unless a matching manifest exists; `compute` returns the manifest's `counts`."""
        stage_dir = self.dir / name
        tag = f"[{name}]"
        fp = fingerprint(name, config, inputs)
        manifest_file = stage_dir / MANIFEST
        if manifest_file.is_file() and not self.force:
            manifest = json.loads(manifest_file.read_text())
            if manifest.get("fingerprint") == fp:
                print(f"{tag} up to date, skipped ({stage_dir})")
                return StageResult(name, stage_dir, True, manifest)
        if stage_dir.exists():
            if manifest_file.is_file():  # complete but stale: keep it aside
                old = json.loads(manifest_file.read_text()).get("fingerprint", "unknown")
                target = self.dir / "_superseded" / f"{name}-{old}"
                if target.exists():
                    target = target.with_name(f"{target.name}-{int(time.time())}")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(stage_dir), str(target))
                print(f"{tag} config or inputs changed; previous outputs moved to {target}")
            else:  # killed midway: nothing complete to keep
                shutil.rmtree(stage_dir)
                print(f"{tag} found an unfinished attempt (no manifest); redoing it")
        stage_dir.mkdir(parents=True)
        self.calls[name] = self.calls.get(name, 0) + 1
        start = time.perf_counter()
        counts = compute(stage_dir)
        manifest = {
            "stage": name,
            "fingerprint": fp,
            "config": config,
            "inputs": inputs,
            "counts": counts,
            "seconds": time.perf_counter() - start,
            "versions": package_versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(manifest_file, manifest)  # last, atomically: its presence means the stage is complete
        return StageResult(name, stage_dir, False, manifest)
