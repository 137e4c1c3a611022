"""`make study [PROFILE=cpu]`: run or resume the reference study (see `mainlib.study`).

python -m mainlib.study --profile smoke            # both studies, tiny sizes
python -m mainlib.study --profile cpu --only main  # one study
python -m mainlib.study --profile cpu --status     # what is done and what remains, nothing run
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from mainlib.study.cells import Cell, progress, run_cells
from mainlib.study.main import main_cells
from mainlib.study.musc import musc_cells
from mainlib.study.spec import FILES, PROFILES, load_spec

SWEEPS = Path("sweeps")


def study_cells(profile: str, only: Sequence[str], root: Path = Path()) -> tuple[Path, list[Cell]]:
    """Every cell of the profile (MAIN's, then MuSC's), all configs checked; and the folder of the cell files:
    `results/study/<profile>/cells/` (small JSON, committed: a later session or machine resumes from git), while
    the stages, adapters and lm-eval caches stay in `runs/study/<profile>/`."""
    runs = root / "runs" / "study" / profile
    folder = root / "results" / "study" / profile / "cells"
    cells: list[Cell] = []
    for study in only:
        spec = load_spec(SWEEPS / FILES[study], profile)
        cells += main_cells(spec, runs, folder) if study == "main" else musc_cells(spec, runs)
    return folder, cells


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mainlib.study", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="cpu", help="sizes (sweeps/study_*.yaml)")
    parser.add_argument("--only", choices=sorted(FILES), nargs="+", default=["main", "musc"], help="which studies")
    parser.add_argument("--status", action="store_true", help="list done and remaining cells, run nothing")
    args = parser.parse_args(argv)
    folder, cells = study_cells(args.profile, args.only)
    if args.status:
        done, remaining = progress(folder, cells)
        print(f"{len(done)} done, {len(remaining)} remaining:", *(f"  todo {name}" for name in remaining), sep="\n")
        return
    started = datetime.now(UTC).isoformat(timespec="seconds")
    # one line per invocation; each cell's JSON has its `finished` time: together, the study's wall time
    append_jsonl(folder.parent / "invocations.jsonl", {"started": started, "only": list(args.only)})
    start = time.perf_counter()
    seconds = run_cells(folder, cells)
    print(f"study ({args.profile}): {len(seconds)} cells ran in {time.perf_counter() - start:.0f} s; all done")


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
