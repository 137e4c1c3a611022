"""Peak resident memory of the quickstart's pipeline, notebook by notebook (each notebook is its own kernel).

    python scripts/quickstart_memory.py [--out results/quickstart/peak_memory.json]

Runs the stages the notebooks run, one fresh process per step, in order, with the quickstart recipe in
one temporary runs folder (so each step finds the earlier stages on disk and runs only its own): 01
`init_sft`, 02 the mutual round and synthesis, 03 scoring, selection and the final SFT plus its
ground-truth check (the aligned forward and reverse adapters score held-out pairs), 04 the MuSC stages.
Reports each process's peak RSS (`ru_maxrss`) and seconds; a notebook's peak is the largest of its steps.
Written to compare the pipeline before and after sharing one base model among the adapters:
for the "before" numbers run it in an older checkout, `cd <checkout> && PYTHONPATH=$PWD python <this script>`
(from elsewhere, the current directory's `mainlib` would be imported; the record names the one used).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = {  # notebook, then the stage the process runs up to (earlier stages are already on disk: skipped)
    "01 init_sft": "main_until('init_sft')",
    "02 round_0": "main_until('round_0')",
    "02 synthesize": "main_until('synthesize')",
    "03 score": "main_until('score')",
    "03 select, final_sft": "main_until('final_sft')",
    "03 ground-truth check": "auc(main)",
    "04 instructions ... respond": "from mainlib.musc.pipeline import run_musc; run_musc(musc, until='respond')",
    "04 token_weights": "from mainlib.musc.pipeline import run_musc; run_musc(musc, until='token_weights')",
    "04 tdpo": "from mainlib.musc.pipeline import run_musc; run_musc(musc)",
}

PRELUDE = """
import resource, sys
from pathlib import Path
from mainlib.config import MainConfig, MuscConfig, build
runs = sys.argv[1]
main = build(MainConfig, "quickstart", runs_dir=runs, run_name="memory")
musc = build(MuscConfig, "quickstart", runs_dir=runs, run_name="memory")

def main_until(stage):
    from mainlib.pipeline import run_main
    try:
        run_main(main, until=stage)
    except ValueError:  # before the v2 core the rounds were one stage, "rounds"
        run_main(main, until="rounds")

def auc(config):
    # notebook 03's check: the aligned adapters score held-out true and shuffled pairs
    from mainlib import data
    from mainlib.models import load_tokenizer
    from mainlib.mutual import ground_truth_auc
    aligned = Path(runs) / "memory" / (f"round_{config.main.rounds - 1}" if config.main.rounds else "init_sft")
    tokenizer = load_tokenizer(config.model)
    pairs = data.clean_pairs(data.load_bundled("heldout"), tokenizer, config.max_length)[0][:40]
    try:
        from mainlib.adapters import ModelBank
        bank = ModelBank(config.model, config.quantization)
        for direction in ("forward", "reverse"):
            bank.load(direction, aligned / direction)
        ground_truth_auc(bank, tokenizer, pairs)
    except (ImportError, TypeError):  # before the model bank: one model per adapter
        from mainlib.models import load_adapter
        forward, reverse = (load_adapter(aligned / d, config.quantization)[0] for d in ("forward", "reverse"))
        ground_truth_auc(forward, reverse, tokenizer, pairs)
"""


def run_step(code: str, runs: str) -> dict:
    start = time.perf_counter()
    program = PRELUDE + code + "\nprint('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    done = subprocess.run([sys.executable, "-c", program, runs], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_KIB"))
    return {"peak_rss_mib": round(peak / 1024, 1), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file to write (default: print only)")
    parser.add_argument("--label", default="now", help="what this checkout is, e.g. 'before (1f11171)'")
    args = parser.parse_args()
    runs = tempfile.mkdtemp(prefix="quickstart_memory_")
    which = [sys.executable, "-c", "import mainlib; print(mainlib.__file__)"]
    where = subprocess.run(which, capture_output=True, text=True)
    record = {"label": args.label, "mainlib": where.stdout.strip(), "steps": {}}
    print("mainlib from", record["mainlib"], flush=True)
    for name, code in STEPS.items():
        record["steps"][name] = run_step(code, runs)
        print(name, record["steps"][name], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
