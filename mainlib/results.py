"""Results as tidy JSON with provenance: the config that made them, package versions, git commit, device.

Every JSON under `results/<run_name>/` is written by `write_result`, atomically (temp file + rename), so a
killed notebook never leaves a half-written file behind.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"  # what a killed atomic write leaves behind
VERSIONED_PACKAGES = ("mainlib", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the mainlib checkout (`+dirty` when tracked files have uncommitted changes), if any."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        # dirty = tracked files changed; new untracked outputs (results/ of this very run) do not count
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_description() -> str:
    import torch  # here, not at the top: `shards` and `stages` use this module without a model

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far, in MiB: CPU resident set, and CUDA allocations when there is a GPU.

    Why: sharing one base among adapters (`adapters.ModelBank`) is about memory; this is what a run reports.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"cpu_peak_rss_mib": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    torch = sys.modules.get("torch")  # not imported: no model ran, so no CUDA memory either
    if torch is not None and torch.cuda.is_available():
        peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def provenance() -> dict[str, Any]:
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": device_description(),
        "python": platform.python_version(),
        "versions": package_versions(),
    }


def _atomic_write(path: Path, chunks: Iterable[str]) -> Path:
    """Stream `chunks` into a temp file in the same folder, fsync it, then rename it over `path`.

    A reader (or a resumed run) sees the old file or the whole new one, never a prefix; a killed writer leaves
    only a `.<name>.*.tmp` file, which is safe to delete. The fsync makes the content durable before the rename.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload: Any) -> Path:
    """Write JSON atomically: into a temp file in the same folder, then rename over the target."""
    return _atomic_write(Path(path), [json.dumps(payload, indent=2, default=str), "\n"])


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON record per line, atomically; `rows` may be a generator (it is streamed, not joined)."""
    return _atomic_write(Path(path), (json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def write_result(results_dir: str | Path, run_name: str, name: str, config: dict[str, Any], **fields: Any) -> Path:
    """`results/<run_name>/<name>.json` = {config, provenance, **fields}; returns its path."""
    payload = {"name": name, "run_name": run_name, "config": config, **fields, "provenance": provenance()}
    return write_json(Path(results_dir) / run_name / f"{name}.json", payload)


def markdown_table(rows: list[dict[str, Any]], max_chars: int = 300) -> str:
    """A Markdown table of `rows` (same keys each); cells are cut to `max_chars` and kept on one line."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])

    def cell(value: Any) -> str:
        text = str(value).replace("|", "\\|").replace("\n", " ⏎ ")
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)
