#!/usr/bin/env python
"""How much one `compare()` (one base load, named adapters) saves over one `evaluate()` per model.

    python scripts/compare_timing.py [RUN_NAME] [LIMIT]      # after `make demo` (default: quickstart 8)

Evaluates base, MAIN (`runs/<run>/final_sft/forward`) and MuSC (`runs/<run>/musc/tdpo/model`) on the quickstart's
tasks and settings (notebook 00's eval parameters) both ways, without the request cache, at a small `limit`: the
work per document is the same both ways, so the difference is the per-call cost (task indexing, model load)
and does not depend on the limit. Checks that both ways give the same numbers, and writes
results/<run>/compare_timing.json.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from mainlib.evaluate import compare, evaluate
from mainlib.results import provenance, write_json

MODEL = "smollm2-135m-instruct"
TASKS = ["mmlu", "ifeval"]
# the quickstart's evaluation settings (notebooks/00_quickstart.ipynb)
SETTINGS = {"max_gen_toks": 128, "batch_size": 8, "headline": {"ifeval": "inst_level_loose_acc,none"}}


def timed(call):
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


def values(rows: list[dict]) -> list[tuple]:
    return sorted((r["label"], r["task"], r["metric"], r["filter"], r["value"]) for r in rows)


def main(run_name: str = "quickstart", limit: int = 8) -> None:
    adapters = {
        "base": None,
        "MAIN": f"runs/{run_name}/final_sft/forward",
        "MuSC": f"runs/{run_name}/musc/tdpo/model",
    }
    with tempfile.TemporaryDirectory() as tmp:
        settings = {**SETTINGS, "limit": limit, "results_dir": tmp, "run_name": "timing"}
        separate, separate_s = timed(
            lambda: [
                {**row, "label": label}  # evaluate() names a model after its adapter folder
                for label, path in adapters.items()
                for row in evaluate(MODEL, path, TASKS, **settings)
            ]
        )
        together, together_s = timed(lambda: compare(MODEL, adapters, TASKS, **settings))
    same = values(separate) == values(together)
    payload = {
        "limit": limit,
        "tasks": TASKS,
        "settings": SETTINGS,
        "models": list(adapters),
        "separate_calls_s": round(separate_s, 1),
        "one_compare_s": round(together_s, 1),
        "saved_s": round(separate_s - together_s, 1),
        "same_numbers": same,
        "provenance": provenance(),
    }
    out = write_json(Path("results") / run_name / "compare_timing.json", payload)
    print(
        f"3 evaluate() calls {separate_s:.1f} s, one compare() {together_s:.1f} s, "
        f"saved {separate_s - together_s:.1f} s; same numbers: {same}; wrote {out}"
    )
    if not same:
        raise SystemExit("compare() and separate evaluate() calls disagree")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["quickstart"]), *(int(a) for a in sys.argv[2:3]))
