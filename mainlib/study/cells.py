"""Cells: the study's units of work, each one JSON file, written once and then only read.

A cell is a name and a function returning a JSON-able dict. `run_cells` runs the cells whose file is missing, in
order, writing each file atomically when its function returns (`results.write_json`): a killed run loses the cell
in progress only, and says before it starts what is done and what remains.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mainlib.results import git_commit, write_json


@dataclass(frozen=True)
class Cell:
    name: str  # a path below the cells folder, e.g. "main/s0/selection"
    compute: Callable[[], dict[str, Any]]
    claim: str = ""  # which claim it serves, for the progress lines


def cell_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.json"


def read_cell(folder: Path, name: str) -> dict[str, Any] | None:
    path = cell_path(folder, name)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def progress(folder: Path, cells: Sequence[Cell]) -> tuple[list[str], list[str]]:
    """(done, remaining) cell names."""
    done = [c.name for c in cells if cell_path(folder, c.name).is_file()]
    return done, [c.name for c in cells if c.name not in done]


def run_cells(folder: Path, cells: Sequence[Cell], log: Callable[[str], None] = print) -> dict[str, float]:
    """Run every cell whose JSON is missing; returns the seconds each took. Each JSON gets its `seconds`, the
    UTC time it `finished` and the `git_commit` that computed it."""
    done, remaining = progress(folder, cells)
    log(f"study: {len(done)} of {len(cells)} cells done, {len(remaining)} to run ({folder})")
    seconds: dict[str, float] = {}
    for number, cell in enumerate((c for c in cells if c.name in remaining), start=1):
        log(f"[{number}/{len(remaining)}] {cell.name}" + (f"  ({cell.claim})" if cell.claim else ""))
        start = time.perf_counter()
        record = cell.compute()
        seconds[cell.name] = time.perf_counter() - start
        finished = datetime.now(UTC).isoformat(timespec="seconds")
        stamp = {"seconds": seconds[cell.name], "finished": finished, "git_commit": git_commit()}
        write_json(cell_path(folder, cell.name), {**record, **stamp})
        log(f"    done in {seconds[cell.name]:.0f} s")
    return seconds
