#!/usr/bin/env python
"""Calibrate our evaluation against SmolLM2-135M-Instruct's model card: same model, published numbers.

    MAINLIB_DATA_DIR=../shared/data python scripts/calibrate.py          # runs what is missing, then the table
    MAINLIB_DATA_DIR=../shared/data python scripts/calibrate.py gsm8k    # only that one (then the table, if complete)

Each evaluation is the one `python -m mainlib.evaluate` runs (the commands are in COMMANDS and in the JSON):
the bundled model, the full offline data, the chat template on ("auto"), lm-eval's own generation settings.
Requests are cached under runs/calibration/cache, so an interrupted run resumes where it stopped; per-document
responses go to runs/calibration/samples (not committed). Writes results/calibration/smollm2-135m-instruct.json
(the table, n, stderr, wall time per task, response lengths) and prints the README's Markdown table.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap

from mainlib.evaluate import main as evaluate_cli
from mainlib.models import load_tokenizer
from mainlib.results import markdown_table, provenance, write_json

RUN = "calibration"
MODEL = "smollm2-135m-instruct"
COMMON = ["--model", MODEL, "--data", "full", "--run-name", RUN, "--results-dir", "results"]
COMMON += ["--cache-dir", "runs/calibration/cache", "--samples-dir", "runs/calibration/samples"]
# benchmark (the result file's suffix) -> its extra arguments. MMLU: the four subjects of the bundled pack,
# whole (890 questions), in lm-eval's multiple-choice form and in the cloze form the card reports; and a slice
# of all 57 subjects in the cloze form.
COMMANDS = {
    "ifeval": ["--tasks", "ifeval"],
    "gsm8k": ["--tasks", "gsm8k", "--limit", "250"],
    "mainlib_mmlu_bundled": ["--tasks", "mainlib_mmlu_bundled", "--headline", "mainlib_mmlu_bundled=acc,none"],
    "mainlib_mmlu_cloze_bundled": [
        "--tasks",
        "mainlib_mmlu_cloze_bundled",
        "--headline",
        "mainlib_mmlu_cloze_bundled=acc_norm,none",
    ],
    # the card's MMLU is all 57 subjects: the first 15 test questions of each, in the cloze form (855 in all)
    "mainlib_mmlu_cloze": [
        "--tasks",
        "mainlib_mmlu_cloze",
        "--limit",
        "15",
        "--headline",
        "mainlib_mmlu_cloze=acc_norm,none",
    ],
}
# HuggingFaceTB/SmolLM2-135M-Instruct model card, "Instruction model" table (percent)
CARD = {
    "ifeval": ("IFEval, average of prompt- and instruction-level (zero-shot, chat template)", 29.9),
    "gsm8k": ("GSM8K (5-shot)", 1.4),
    "mainlib_mmlu_cloze_bundled": ("MMLU (cloze)", 29.3),
    "mainlib_mmlu_cloze": ("MMLU (cloze)", 29.3),
}
IFEVAL_CAP = 1280  # lm-eval's max_gen_toks for IFEval
IFEVAL_AVERAGES = {"strict": ("prompt_level_strict_acc", "inst_level_strict_acc")}
IFEVAL_AVERAGES["loose"] = ("prompt_level_loose_acc", "inst_level_loose_acc")


def result_file(benchmark: str) -> Path:
    return Path("results") / RUN / "eval" / f"{MODEL}__{benchmark}.json"


def ifeval_average(samples: list[dict], prompt_metric: str, inst_metric: str) -> tuple[float, float]:
    """(prompt-level + instruction-level) / 2 and its stderr, by bootstrap over prompts (both use the same ones)."""
    prompt = np.array([float(s[prompt_metric]) for s in samples])
    hits = np.array([float(sum(s[inst_metric])) for s in samples])
    totals = np.array([float(len(s[inst_metric])) for s in samples])

    def average(p, h, t, axis=-1):
        return (p.mean(axis) + h.sum(axis) / t.sum(axis)) / 2

    value = float(average(prompt, hits, totals))
    result = bootstrap((prompt, hits, totals), average, paired=True, vectorized=True, n_resamples=2000, rng=0)
    return value, float(result.standard_error)


def ifeval_by_finish(samples: list[dict], cap: int, tokenizer) -> list[dict]:
    """Prompt-level loose accuracy of responses that stopped vs those that ran into the token cap."""
    rows = []
    lengths = [len(tokenizer(s["resps"][0][0], add_special_tokens=False).input_ids) for s in samples]
    for name, keep in (("stopped", lambda n: n < cap - 1), ("ran to the cap", lambda n: n >= cap - 1)):
        chosen = [s for s, n in zip(samples, lengths, strict=True) if keep(n)]
        accuracy = float(np.mean([s["prompt_level_loose_acc"] for s in chosen])) if chosen else None
        rows.append({"responses": name, "n": len(chosen), "prompt_level_loose_acc": accuracy})
    return rows


def table_rows(records: dict[str, dict], samples: list[dict]) -> list[dict]:
    """One row per compared number: ours (percent ± stderr, n), the card's, the task's wall time."""
    rows = []
    for benchmark, record in records.items():
        for r in record["summary"]:
            if r["task"] != record["settings"]["task"]:
                continue
            rows.append(
                {
                    "benchmark": benchmark,
                    "metric": f"{r['metric']},{r['filter']}",
                    "ours": round(100 * r["value"], 1),
                    "stderr": None if r["stderr"] is None else round(100 * r["stderr"], 1),
                    "n": r["n"],
                    # the card's IFEval number is an average: it goes on the average rows below
                    "card": CARD[benchmark][1]
                    if r["headline"] and benchmark in CARD and benchmark != "ifeval"
                    else None,
                    "seconds": round(record["seconds"]),
                }
            )
    if samples and "ifeval" in records:
        seconds = round(records["ifeval"]["seconds"])
        for strictness, (prompt_metric, inst_metric) in IFEVAL_AVERAGES.items():
            value, stderr = ifeval_average(samples, prompt_metric, inst_metric)
            rows.append(
                {
                    "benchmark": "ifeval",
                    "metric": f"average of prompt and instruction level ({strictness})",
                    "ours": round(100 * value, 1),
                    "stderr": round(100 * stderr, 1),
                    "n": len(samples),
                    "card": CARD["ifeval"][1],
                    "seconds": seconds,
                }
            )
    return rows


def reuse_sample_rows(rows: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """Add the IFEval average rows and by-finish split of the committed table, when its IFEval run is the same.

    They need the per-prompt samples, which live under runs/ and are not kept across checkouts.
    """
    committed_file = Path("results") / RUN / f"{MODEL}.json"
    if not committed_file.is_file() or not result_file("ifeval").is_file():
        return rows, None
    committed = json.loads(committed_file.read_text())
    ifeval = json.loads(result_file("ifeval").read_text())
    if committed.get("settings", {}).get("ifeval") != ifeval["settings"]:
        return rows, None
    averages = [r for r in committed["table"] if r["benchmark"] == "ifeval" and r["metric"].startswith("average")]
    return rows + averages, committed.get("ifeval_by_finish")


def main(only: list[str]) -> None:
    """Run the evaluations whose result file is missing (only those named, if any), then write the table."""
    unknown = sorted(set(only) - set(COMMANDS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(COMMANDS)}")
    for benchmark, extra in COMMANDS.items():
        if not result_file(benchmark).is_file() and (not only or benchmark in only):
            print("$ python -m mainlib.evaluate " + shlex.join(COMMON + extra), flush=True)
            evaluate_cli(COMMON + extra)
    missing = [b for b in COMMANDS if not result_file(b).is_file()]
    if missing:
        print(f"not run yet (left out of the table): {', '.join(missing)}", file=sys.stderr)
    records = {b: json.loads(result_file(b).read_text()) for b in COMMANDS if b not in missing}
    samples_file = Path("runs") / RUN / "samples" / f"{MODEL}__ifeval.jsonl"
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()] if samples_file.is_file() else []
    rows = table_rows(records, samples)
    by_finish = ifeval_by_finish(samples, IFEVAL_CAP, load_tokenizer(MODEL)) if samples else None
    if not samples:  # runs/ is not kept: reuse what the committed table computed from the IFEval samples
        rows, by_finish = reuse_sample_rows(rows)
    payload = {
        "model": MODEL,
        "card": {b: {"what": what, "value": value} for b, (what, value) in CARD.items()},
        "commands": {b: "python -m mainlib.evaluate " + shlex.join(COMMON + extra) for b, extra in COMMANDS.items()},
        "settings": {b: r["settings"] for b, r in records.items()},
        "table": rows,
        "responses": {b: r.get("responses") for b, r in records.items()},
        "not_run": missing,
        "ifeval_by_finish": by_finish,
        "provenance": provenance(),
    }
    out = write_json(Path("results") / RUN / f"{MODEL}.json", payload)
    print(markdown_table(rows))
    if by_finish:
        print(markdown_table(by_finish))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
