"""Declarative, resumable stages: one runner for every pipeline (MAIN, MuSC).

A pipeline is a list of `Stage` declarations, in order. Each stage says what it reads from the config
(`reads`: dotted field paths), which earlier stages it consumes (`needs`), which data files it reads
(`files`: config fields holding a path) and which code its outputs depend on (`code`). Its fingerprint is
derived from exactly that, plus the fingerprints of the stages it needs:

    fingerprint = hash(name, params, values of `reads`, contents of `files`, source of `code`, needs' fingerprints)

so a changed field reruns the stages that read it and everything downstream, and an edited prompt template
reruns the stages whose code includes it. A stage only sees the config through a `ConfigView` of its
`reads`: reading anything else is an `UndeclaredRead` error, so the declaration cannot drift from the code.

On disk, each stage lives in `runs/<run_name>/<stage>/`, finished by a `manifest.json` written last and
atomically. The runner:
- skips a stage whose manifest has the current fingerprint;
- restores a stage from `_superseded/` when an earlier result of the same fingerprint is kept there;
- moves a complete but stale stage to `_superseded/` (never deletes outputs) before recomputing it;
- resumes an unfinished attempt of the same fingerprint (`attempt.json`; sharded stages pick up at the first
  missing shard) and moves an unfinished attempt of another fingerprint aside;
- reruns everything with `force=True`.
A run directory made for another model or data (`run.json`) is an error that says what to change.

One process at a time works in a run directory: `execute` holds an exclusive lock on `<run>/.lock` (see
`RunLock`); a second process fails at once, naming the holder. A finished run on read-only storage opens
for reading: nothing is written when every stage is up to date.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from mainlib import distributed
from mainlib.results import package_versions, write_json

MANIFEST = "manifest.json"
ATTEMPT = "attempt.json"
SUPERSEDED = "_superseded"
LOCK = ".lock"


class RunMismatchError(ValueError):
    """The run directory belongs to another experiment."""


class RunLocked(RuntimeError):
    """Another live process is working in this run directory."""


class RunReadOnly(PermissionError):
    """The run directory cannot be written, and a stage still has to be computed."""


class UndeclaredRead(AttributeError):
    """A stage read a config field it does not declare: its fingerprint would miss that field."""


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able values (configs, input fingerprints, data)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Stage:
    """One declared step of a pipeline."""

    name: str
    compute: Callable[[StageContext], dict[str, Any]]  # returns the manifest's `counts`
    reads: tuple[str, ...] = ()  # config paths ("lora", "main.final_alpha"): a path covers its sub-fields
    needs: tuple[str, ...] = ()  # earlier stages whose outputs it consumes
    files: tuple[str, ...] = ()  # config paths holding a file path: the file's bytes are fingerprinted
    code: tuple[ModuleType | Callable, ...] = ()  # besides `compute`'s own module
    params: dict[str, Any] = field(default_factory=dict)  # static arguments, e.g. {"k": 0} for round_0
    resumable: bool = False  # True: an unfinished attempt is continued (sharded stages), not started over
    every_process: bool = False  # under `accelerate launch`, True: all processes run `compute` (training with DDP,
    # sharded stages on their own shards); False: the main process does, the others wait for its result


@dataclass
class StageResult:
    name: str
    dir: Path
    skipped: bool
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


@dataclass
class StageContext:
    """What `compute` gets: its config view, its folder, the results it needs, the pipeline's shared objects."""

    stage: Stage
    config: Any  # a ConfigView: only the declared fields
    dir: Path
    inputs: dict[str, StageResult]
    fingerprint: str  # sharded outputs are tagged with it, so a resume never mixes settings
    shared: Any = None  # e.g. the tokenizer and the model bank, owned by the pipeline

    @property
    def params(self) -> dict[str, Any]:
        return self.stage.params


# -- reading the config ---------------------------------------------------------------------------------------


def config_value(config: Any, path: str) -> Any:
    """`config.a.b` for path "a.b"."""
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _jsonable(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


class ConfigView:
    """Attribute access to the declared fields of a config; anything else raises `UndeclaredRead`."""

    def __init__(self, config: Any, reads: Sequence[str], stage: str, prefix: str = "") -> None:
        self._config, self._reads, self._stage, self._prefix = config, tuple(reads), stage, prefix

    def __getattr__(self, name: str) -> Any:
        path = self._prefix + name
        value = getattr(self._config, name)
        if any(path == r or path.startswith(r + ".") for r in self._reads):
            return value  # declared whole: the real object
        if any(r.startswith(path + ".") for r in self._reads):
            return ConfigView(value, self._reads, self._stage, path + ".")  # declared in part
        raise UndeclaredRead(
            f"stage {self._stage!r} reads config.{path} but does not declare it; add {path!r} to its `reads`"
        )


# -- fingerprints ---------------------------------------------------------------------------------------------


@cache
def _source_hash(obj: ModuleType | Callable) -> str:
    """Hash of the source file of a module (or of the module defining a function): edits rerun its stages."""
    module = obj if isinstance(obj, ModuleType) else inspect.getmodule(obj)
    return hashlib.sha256(Path(inspect.getfile(module)).read_bytes()).hexdigest()[:16]


def code_version(stage: Stage) -> dict[str, str]:
    objects = (stage.compute, *stage.code)
    modules = {(o if isinstance(o, ModuleType) else inspect.getmodule(o)).__name__: o for o in objects}
    return {name: _source_hash(obj) for name, obj in sorted(modules.items())}


def file_hash(path: str | None) -> str | None:
    """Content hash of a data file; bundled or hub names (no such file) are fingerprinted by name only."""
    if path is None or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def stage_key(stage: Stage, config: Any, needed: dict[str, str]) -> dict[str, Any]:
    """Everything a stage's outputs depend on (stored in its manifest; the fingerprint is its hash)."""
    return {
        "params": stage.params,
        "config": {path: _jsonable(config_value(config, path)) for path in stage.reads},
        "files": {path: file_hash(config_value(config, path)) for path in stage.files},
        "code": code_version(stage),
        "inputs": {name: needed[name] for name in stage.needs},
    }


def check_declarations(stages: Sequence[Stage], config: Any) -> None:
    """Unique names, needs that come earlier, reads and files that exist in the config."""
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} is declared twice")
        missing = [n for n in stage.needs if n not in seen]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {missing}, which are not declared before it")
        for path in (*stage.reads, *stage.files):
            try:
                config_value(config, path)
            except AttributeError:
                raise ValueError(f"stage {stage.name!r} declares config path {path!r}, which does not exist") from None
        seen.add(stage.name)


def plan(stages: Sequence[Stage], config: Any) -> dict[str, str]:
    """Each stage's fingerprint, in order (no work, no model: what would run is decided from this)."""
    check_declarations(stages, config)
    fingerprints: dict[str, str] = {}
    for stage in stages:
        fingerprints[stage.name] = fingerprint(stage.name, stage_key(stage, config, fingerprints))
    return fingerprints


# -- the run directory ----------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


class RunLock:
    """An exclusive lock on a run directory, held by one process while it works there.

    `flock` on `<run>/.lock`: the kernel drops it when the holder dies (kill -9 included), so a stale lock
    of a dead process is simply acquired again, atomically, by the next process. The file holds the
    holder's pid, host and start time, for the message the second process gets; a lock file that still
    names a holder when acquired was left by a process that died.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._file: Any = None

    def acquire(self) -> None:
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that is starting"
            handle.close()
            raise RunLocked(
                f"{self.path.parent} is in use by another process ({holder}). Wait for it to finish, or "
                "choose another run_name."
            ) from None
        handle.seek(0)
        if previous := handle.read().strip():
            print(f"[run] taking over the lock of a process that is gone ({previous})")
        handle.seek(0)
        handle.truncate()
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, started {started}")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Empty the file (an empty lock file means a clean exit), then unlock."""
        if self._file is not None:
            self._file.truncate(0)
            self._file.flush()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


class Run:
    """A run directory and its stages. `identity` (base model, data) is fixed for the life of the directory."""

    def __init__(self, run_dir: str | Path, identity: dict[str, Any], force: bool = False) -> None:
        self.dir = Path(run_dir)
        self.force = force
        self.calls: dict[str, int] = {}  # how often each stage really ran in this process (tests read it)
        self.dir.mkdir(parents=True, exist_ok=True)
        recorded = (_read(self.dir / "run.json") or {}).get("identity", {})
        changed = {k: (recorded.get(k), v) for k, v in identity.items() if recorded and recorded.get(k) != v}
        if changed and not force:
            what = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in changed.items())
            raise RunMismatchError(
                f"{self.dir} was made for a different experiment ({what}). Choose another run_name, or pass "
                "force=True to recompute in it (its current outputs are kept under _superseded/)."
            )
        self.identity = identity  # written to run.json when the first stage completes: a run whose inputs fail
        # before that leaves no claim on the directory, so fixing the data file and rerunning just works
        self.read_only: OSError | None = None  # why the directory cannot be written, when it cannot

    def status(self, name: str, fp: str) -> str:
        """ "done" (manifest matches), "kept" (in _superseded/), "partial" (same attempt), "stale" or "new"."""
        stage_dir = self.dir / name
        manifest, attempt = _read(stage_dir / MANIFEST), _read(stage_dir / ATTEMPT)
        if self.force:
            return "stale" if stage_dir.exists() else "new"
        if manifest and manifest.get("fingerprint") == fp:
            return "done"
        if (self.dir / SUPERSEDED / f"{name}-{fp}" / MANIFEST).is_file():
            return "kept"
        if not manifest and attempt and attempt.get("fingerprint") == fp:
            return "partial"
        return "stale" if stage_dir.exists() else "new"

    def _set_aside(self, name: str, tag: str) -> Path:
        target = self.dir / SUPERSEDED / f"{name}-{tag}"
        if target.exists():
            target = target.with_name(f"{target.name}-{int(time.time())}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.dir / name), str(target))
        return target

    def _prepare(self, name: str, fp: str, resumable: bool) -> str:
        """Get `runs/<run>/<name>` ready for fingerprint `fp`; returns the status it was found in."""
        stage_dir, tag = self.dir / name, f"[{name}]"
        state = self.status(name, fp)
        if state == "partial" and not resumable:
            state = "stale"
        manifest = _read(stage_dir / MANIFEST)
        if state in ("stale", "kept") and stage_dir.exists():
            if manifest:
                moved = self._set_aside(name, manifest["fingerprint"])
                print(f"{tag} config, code or inputs changed; previous outputs moved to {moved}")
            elif resumable and any(stage_dir.iterdir()):  # unfinished, other settings: its shards may be hours
                moved = self._set_aside(name, f"{(_read(stage_dir / ATTEMPT) or {}).get('fingerprint')}-unfinished")
                print(f"{tag} an unfinished attempt with other settings was moved to {moved}")
            else:
                shutil.rmtree(stage_dir)
                print(f"{tag} found an unfinished attempt; redoing it")
        if state == "kept":
            shutil.move(str(self.dir / SUPERSEDED / f"{name}-{fp}"), str(stage_dir))
            print(f"{tag} restored from {SUPERSEDED}/ (same fingerprint as an earlier run)")
        elif state == "partial":
            print(f"{tag} resuming an unfinished attempt ({stage_dir})")
        elif state in ("stale", "new"):
            stage_dir.mkdir(parents=True)
            write_json(stage_dir / ATTEMPT, {"fingerprint": fp, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        return state

    def _compute(
        self, stage: Stage, fp: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
    ) -> StageResult:
        """Run `compute` (in every process, or only the main one: `Stage.every_process`); the main process then
        writes the manifest, and every process gets it."""
        self.calls[stage.name] = self.calls.get(stage.name, 0) + 1
        start = time.perf_counter()
        if stage.every_process:
            counts = compute()  # the main process's counts go into the manifest
            manifest = distributed.on_main(lambda: self._finish(stage.name, fp, key, counts, start))
        else:
            manifest = distributed.on_main(lambda: self._finish(stage.name, fp, key, compute(), start))
        return StageResult(stage.name, self.dir / stage.name, False, manifest)

    def _finish(self, name: str, fp: str, key: dict[str, Any], counts: dict[str, Any], start: float) -> dict[str, Any]:
        stage_dir = self.dir / name
        manifest = {
            "stage": name,
            "fingerprint": fp,
            **key,
            "counts": counts,
            "seconds": time.perf_counter() - start,
            "versions": package_versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(stage_dir / MANIFEST, manifest)  # last, atomically: its presence means the stage is complete
        if (_read(self.dir / "run.json") or {}).get("identity") != self.identity:  # absent, or force=True
            write_json(self.dir / "run.json", {"identity": self.identity})
        (stage_dir / ATTEMPT).unlink(missing_ok=True)
        return manifest

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the run's lock while working in it (the main process holds it for all the processes of a launch);
        on read-only storage, go on for reading only."""
        lock = RunLock(self.dir)
        self.read_only = distributed.on_main(lambda: self._acquire(lock))
        try:
            yield
        finally:
            lock.release()

    @staticmethod
    def _acquire(lock: RunLock) -> OSError | None:
        """Take the lock; the error that says the folder cannot be written, when it cannot."""
        try:
            lock.acquire()
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            return e  # fine while every stage is up to date: `_run_one` checks before any write
        return None

    def _run_one(
        self, stage: Stage, fp: str, key: dict[str, Any], compute: Callable[[], dict[str, Any]]
    ) -> StageResult:
        name = stage.name
        if self.read_only and self.status(name, fp) != "done":
            raise RunReadOnly(
                f"{self.dir} cannot be written ({self.read_only.strerror}) and stage {name!r} is not up to date "
                "with this config: copy the run to writable storage, or ask only for the finished stages (`until`)."
            )
        state = distributed.on_main(lambda: self._prepare(name, fp, stage.resumable))
        if state in ("done", "kept"):
            if state == "done" and distributed.is_main():
                print(f"[{name}] up to date, skipped ({self.dir / name})")
            return StageResult(name, self.dir / name, True, _read(self.dir / name / MANIFEST))
        return self._compute(stage, fp, key, compute)

    def execute(self, stages: Sequence[Stage], config: Any, until: str | None = None, shared: Any = None):
        """Run (or skip, restore, resume) the declared stages in order, up to and including `until`."""
        names = [s.name for s in stages]
        if until is not None and until not in names:
            raise ValueError(f"until must be one of {', '.join(names)}; got {until!r}")
        fingerprints = plan(stages, config)
        with self._locked():
            return self._execute(stages, config, until, shared, fingerprints)

    def _execute(
        self, stages: Sequence[Stage], config: Any, until: str | None, shared: Any, fingerprints: dict[str, str]
    ) -> dict[str, StageResult]:
        results: dict[str, StageResult] = {}
        for stage in stages:
            key = stage_key(stage, config, fingerprints)
            context = StageContext(
                stage,
                ConfigView(config, stage.reads, stage.name),
                self.dir / stage.name,
                {n: results[n] for n in stage.needs},
                fingerprints[stage.name],
                shared,
            )
            compute = lambda stage=stage, context=context: stage.compute(context)  # noqa: E731
            results[stage.name] = self._run_one(stage, fingerprints[stage.name], key, compute)
            if stage.name == until:
                break
        return results
