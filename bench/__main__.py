"""python -m bench SUITE [SUITE ...] --out results/bench/<gpu>.json [--profile gpu|cpu|smoke]

Suites: sft, generate, score, tdpo, memory, or all; `sft/<shape>` runs one shape of `sft` (e.g.
`sft/llama-2-7b`), so that a long suite can be split across calls. Profiles size the cases: `gpu` (default) the issue's
shapes and batches (Llama-3.2-1B / Llama-2-7B); `cpu` the bundled SmolLM2-135M shape at batches a 2-core
CPU finishes in minutes (memory as peak RSS; no memory suite: its 7B QLoRA target is a GPU one); `smoke`
tiny shapes, seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import generate, memory, score, tdpo
from bench.measure import TRACE, free_memory
from bench.report import checks, plot, verdicts
from bench.sft import VARIANTS, SFTCase, run_case
from mainlib.results import provenance, write_json

SMOKE_VARIANTS = ("default", "checkpointed", "flex_packed", "liger")  # the last two: recorded as skipped on CPU
CPU_VARIANTS = ("default", "uncheckpointed", "unquantized", "sdpa_packed", "sdpa_packed_checkpointed")
GPU_7B_VARIANTS = ("default", "checkpointed", "flex_packed_checkpointed", "liger_checkpointed")


def suites(profile: str) -> dict[str, Callable[[], dict]]:
    """Each suite's cases for a profile (see the module docstring). Keys name the target shapes."""
    if profile == "smoke":
        small = dict(lengths=(16, 64), warmup=1, steps=2)
        return {
            "sft/llama-3.2-1b": lambda: run_case(SFTCase("tiny", 4, **small, variants=SMOKE_VARIANTS)),
            "generate": lambda: generate.run(
                generate.GenerateCase("tiny", batch=4, prompt_len=16, new_tokens=8, repeats=1)
            ),
            "score": lambda: score.run(
                score.ScoreCase("tiny", pairs=8, lengths=(16, 64), repeats=1, max_batch_sizes=(None, 4))
            ),
            "tdpo": lambda: tdpo.run(tdpo.DPOCase("tiny", 2, (8, 16), (8, 32), warmup=1, steps=2)),
            "memory": lambda: memory.run(
                SFTCase("tiny", 1, (128, 128), warmup=1, steps=1, variants=("checkpointed",), stock=False)
            ),
        }
    if profile == "cpu":
        shape = "smollm2-135m"
        return {
            f"sft/{shape}": lambda: run_case(SFTCase(shape, 4, (128, 512), warmup=1, steps=4, variants=CPU_VARIANTS)),
            "generate": lambda: generate.run(generate.GenerateCase(shape, batch=16, prompt_len=64, new_tokens=64)),
            "score": lambda: score.run(
                score.ScoreCase(shape, pairs=32, lengths=(128, 512), repeats=2, max_batch_sizes=(None, 64))
            ),
            "tdpo": lambda: tdpo.run(tdpo.DPOCase(shape, 4, (64, 128), (64, 256), warmup=1, steps=4)),
        }
    return {
        "sft/llama-3.2-1b": lambda: run_case(SFTCase("llama-3.2-1b", 8, variants=tuple(VARIANTS))),
        "sft/llama-2-7b": lambda: run_case(SFTCase("llama-2-7b", 4, warmup=2, steps=6, variants=GPU_7B_VARIANTS)),
        "generate": lambda: generate.run(generate.GenerateCase("llama-3.2-1b")),
        "score": lambda: score.run(score.ScoreCase("llama-3.2-1b", max_batch_sizes=(None, 16, 128))),
        "tdpo": lambda: tdpo.run(tdpo.DPOCase("llama-3.2-1b")),
        "memory": lambda: memory.run(
            SFTCase("llama-2-7b", 1, (2048, 2048), warmup=1, steps=3, variants=("checkpointed",), stock=False)
        ),
    }


def selected(table: dict, requested: list[str]) -> list[str]:
    """The units of `table` that `requested` names: `all`, a suite (`sft`: every shape), or one unit."""
    if "all" in requested:
        return list(table)
    return [unit for unit in table if any(unit == r or unit.startswith(r + "/") for r in requested)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suites", nargs="+", help="sft, sft/<shape>, generate, score, tdpo, memory or all")
    parser.add_argument("--out", required=True, help="JSON file; suites already in it are kept unless rerun")
    parser.add_argument("--profile", choices=["gpu", "cpu", "smoke"], default="gpu", help="case sizes")
    parser.add_argument("--trace", action="store_true", help="also profile one more call of each path")
    args = parser.parse_args(argv)
    TRACE["on"] = args.trace

    table = suites(args.profile)
    names = selected(table, args.suites)
    if not names:
        parser.error(f"profile {args.profile!r} has none of {args.suites}; it has: {', '.join(table)}")
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.is_file() else {"suites": {}, "commands": {}}
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    for name in names:
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        result = table[name]()
        result["wall_seconds"] = time.perf_counter() - start
        suite, _, shape = name.partition("/")
        if shape:  # sft/<shape> -> suites["sft"][shape]
            payload["suites"].setdefault(suite, {})[shape] = result
        else:
            payload["suites"][suite] = result
        payload["commands"][name] = command
        free_memory()
        payload["verdicts"] = verdicts(payload["suites"], args.profile)
        payload["checks"] = checks(payload["suites"])
        payload.setdefault("profiles", {})[name] = args.profile
        payload["provenance"] = provenance()
        write_json(out, payload)  # after every suite: a later crash keeps what was measured
        print(json.dumps({k: v for k, v in result.items() if k != "case"}, indent=1, default=str))
    shapes = {"gpu": "the targets' shapes", "cpu": "SmolLM2-135M shape, CPU batches", "smoke": "tiny shapes"}
    title = f"{payload['provenance']['device']} ({shapes[args.profile]})"
    plot(payload["verdicts"], title, out.with_suffix(".png"))
    for row in payload["verdicts"]:
        print(f"[bench] {row['target']}: {row['value']} {row['op']} {row['threshold']} -> {row['met']}")
    failed = [k for k, ok in payload["checks"].items() if not ok]
    if failed:
        print(f"[bench] correctness checks FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
