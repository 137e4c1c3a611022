"""Data-stage throughput with 1 and N processes of one `accelerate launch`, on the same trained adapters.

    python -m bench.processes --out results/scale/processes_cpu.json            # quickstart, 1 vs 2 processes
    python -m bench.processes --recipe paper --processes 1 8 --set n_pool=20000 --out results/scale/processes_h100.json

Trains once (`mainlib.run --until <the stage before synthesize>`, not timed), then for each process count copies
that run and runs synthesize and score in it (`--until score`), so every count starts from the same adapters.
Rows/s of a stage = its rows / its manifest's seconds (the stage's whole compute, waits for the slowest process
included). On CPU, 1 process uses every core's thread and N processes one thread each (torchrun's default):
the comparison is the same cores split two ways. On GPUs each process has its own GPU (configs/accelerate/ddp.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from mainlib.config import MainConfig, build
from mainlib.plots import save_figure
from mainlib.results import provenance, write_json
from mainlib.run import parse_overrides

ROOT = Path(__file__).resolve().parents[1]
DATA_STAGES = ("synthesize", "score")


def launch(recipe: str, flat: list[str], processes: int, until: str) -> float:
    """`mainlib.run` in `processes` processes (torchrun through accelerate); returns the wall seconds."""
    run = ["-m", "mainlib.run", recipe, "--until", until, "--set", *flat]
    if processes == 1:
        command = [sys.executable, *run]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
        command += ["--num_processes", str(processes), "--main_process_port", "0", "--mixed_precision", "no", *run]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start


def stage_rates(run_dir: Path) -> dict[str, Any]:
    """Rows, seconds and rows/s of each data stage, from its manifest and its shard manifests."""
    rates = {}
    for stage in DATA_STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        shards = [json.loads(p.read_text()) for p in sorted((run_dir / stage / "shards").glob("*.json"))]
        rows = sum(s["rows_in"] for s in shards)
        seconds = manifest["seconds"]
        rates[stage] = {
            "rows": rows,
            "seconds": seconds,
            "rows_per_second": rows / seconds,
            "shards_per_process": {
                str(p): sum(s["process"] == p for s in shards) for p in {s["process"] for s in shards}
            },
        }
    return rates


def agreement(runs: list[Path]) -> dict[str, Any]:
    """Whether every run wrote what the first did: the same synthesis bytes, scores within float rounding."""

    def scores(run: Path) -> list[dict[str, float]]:
        files = sorted((run / "score" / "shards").glob("*.jsonl"))
        return [json.loads(line) for path in files for line in path.read_text().splitlines()]

    rows = scores(runs[0])
    synthesis = {(run / "synthesize" / "rows.jsonl").read_bytes() for run in runs}
    gaps = [abs(a[k] - b[k]) for run in runs[1:] for a, b in zip(scores(run), rows, strict=True) for k in a]
    return {"same_synthesis": len(synthesis) == 1, "max_score_difference": max(gaps, default=0.0)}


def report(results: dict[str, Any], runs: list[Path], payload: dict[str, Any], out: Path) -> None:
    """Speedups against the first process count, the outputs' agreement, the JSON and its figure."""
    first = next(iter(results.values()))["stages"]
    for result in results.values():
        for stage, rate in result["stages"].items():
            rate["speedup"] = rate["rows_per_second"] / first[stage]["rows_per_second"]
    payload = {**payload, "processes": results, "agreement": agreement(runs), "provenance": provenance()}
    write_json(out, payload)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    width = 0.8 / len(results)
    for i, (n, result) in enumerate(results.items()):
        rates = [result["stages"][stage]["rows_per_second"] for stage in DATA_STAGES]
        bars = ax.bar([x + i * width for x in range(len(DATA_STAGES))], rates, width, label=f"{n} process(es)")
        ax.bar_label(bars, [f"x{result['stages'][s]['speedup']:.2f}" for s in DATA_STAGES], fontsize=8)
    ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(DATA_STAGES))], DATA_STAGES)
    ax.set_ylabel("rows per second")
    ax.set_title(f"data stages by process count ({payload['provenance']['device']})", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out.parent, out.stem)
    for n, result in results.items():
        rates = result["stages"].items()
        line = ", ".join(f"{s} {r['rows_per_second']:.2f} rows/s (x{r['speedup']:.2f})" for s, r in rates)
        print(f"[processes] {n}: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.processes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", nargs="*", default=["n_pool=64", "shard_size=8"], help="flat overrides")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    config = build(MainConfig, args.recipe, **parse_overrides(args.set))
    base = f"processes-{Path(args.recipe).stem}"
    runs = ROOT / config.runs_dir
    trained = f"round_{config.main.rounds - 1}" if config.main.rounds else "init_sft"
    print(f"[processes] training once ({base}, until {trained})", flush=True)
    launch(args.recipe, [*args.set, f"run_name={base}"], 1, trained)
    results = {}
    for n in args.processes:
        name = f"{base}-p{n}"
        shutil.rmtree(runs / name, ignore_errors=True)
        shutil.copytree(runs / base, runs / name)
        print(f"[processes] {n} process(es): {', '.join(DATA_STAGES)}", flush=True)
        wall = launch(args.recipe, [*args.set, f"run_name={name}"], n, DATA_STAGES[-1])
        results[str(n)] = {"wall_seconds": wall, "stages": stage_rates(runs / name)}
    command = "python -m bench.processes " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"command": command, "recipe": args.recipe, "overrides": args.set}
    report(results, [runs / f"{base}-p{n}" for n in args.processes], payload, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
