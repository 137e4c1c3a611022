#!/usr/bin/env python
"""Build the bundled data pack `mainlib/data/bundled/` from the public files in `$MAINLIB_DATA_DIR`.

Deterministic (seeded); only MIT / Apache-2.0 sources; every split disjoint from the others and from
the evaluation subsets. Writes the pack, `SOURCES.md` (origin, commit, licence, rows) and
`manifest.json` (row counts and sha256 of every file). Usage:

    MAINLIB_DATA_DIR=../shared/data python scripts/build_bundled_data.py
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from mainlib.benchmarks import gsm8k_solution
from mainlib.musc.constraints import complex_instruction

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mainlib.paths import BUNDLED_DIR, data_dir  # noqa: E402

SEED = 0
N_SEED_USER_ORIENTED = 25  # 175 Self-Instruct seed tasks + 25 user-oriented tasks = 200 seed pairs
N_HELDOUT = 50
N_COMPLEX = 100
N_UNLABELED = 500
N_GSM8K_TEST = 100
N_GSM8K_FEWSHOT = 20
MMLU_SUBJECTS = ("astronomy", "high_school_geography", "marketing", "nutrition")
N_MMLU_PER_SUBJECT = 25
N_IFEVAL = 100
N_HUMANEVAL = 20

# Source files, with the origin, commit and licence recorded in $MAINLIB_DATA_DIR/SOURCES.md.
SOURCES = {
    "self_instruct_seed_tasks.jsonl": (
        "yizhongw/self-instruct : data/seed_tasks.jsonl",
        "0b26ccaa415992100fa32df62d41b994cf928e23",
        "Apache-2.0",
    ),
    "self_instruct_user_oriented_instructions.jsonl": (
        "yizhongw/self-instruct : human_eval/user_oriented_instructions.jsonl",
        "0b26ccaa415992100fa32df62d41b994cf928e23",
        "Apache-2.0",
    ),
    "gsm8k_train.jsonl": (
        "openai/grade-school-math : grade_school_math/data/train.jsonl",
        "3101c7d5072418e28b9008a6636bde82a006892c",
        "MIT",
    ),
    "gsm8k_test.jsonl": (
        "openai/grade-school-math : grade_school_math/data/test.jsonl",
        "3101c7d5072418e28b9008a6636bde82a006892c",
        "MIT",
    ),
    "mmlu": (
        "HaeChan0305/MLILAB-FedLLM : data/mmlu/{test,dev}/ (upstream hendrycks/test)",
        "d92730e8bacd7b3a61e551e015e40588e10234b4",
        "MIT",
    ),
    "ifeval_input_data.jsonl": (
        "google-research/google-research : instruction_following_eval/data/input_data.jsonl "
        "(copy from microsoft/llm-steer-instruct)",
        "4f84882e57d22897a28cad4ce7e1f8ab60b06dad",
        "Apache-2.0",
    ),
    "HumanEval.jsonl.gz": (
        "openai/human-eval : data/HumanEval.jsonl.gz",
        "6d43fb980f9fee3c892a914eda09951f772ad10d",
        "MIT",
    ),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def self_instruct_pair(task: dict, source: str) -> dict:
    instance = task["instances"][0]
    instruction = task["instruction"].strip()
    if instance["input"].strip():
        instruction = f"{instruction}\n\n{instance['input'].strip()}"
    return {"instruction": instruction, "response": instance["output"].strip(), "source": f"{source}:{task['id']}"}


def build(src: Path, out: Path) -> dict:
    rng = random.Random(SEED)
    files: dict[str, int] = {}

    seed_tasks = read_jsonl(src / "self_instruct_seed_tasks.jsonl")
    user_tasks = read_jsonl(src / "self_instruct_user_oriented_instructions.jsonl")
    order = list(range(len(user_tasks)))
    rng.shuffle(order)
    seed_user = order[:N_SEED_USER_ORIENTED]
    heldout_user = order[N_SEED_USER_ORIENTED : N_SEED_USER_ORIENTED + N_HELDOUT]
    complex_user = order[N_SEED_USER_ORIENTED + N_HELDOUT : N_SEED_USER_ORIENTED + N_HELDOUT + N_COMPLEX]

    seed = [self_instruct_pair(t, "self_instruct_seed") for t in seed_tasks]
    seed += [self_instruct_pair(user_tasks[i], "self_instruct_user_oriented") for i in sorted(seed_user)]
    write_jsonl(out / "seed.jsonl", seed)
    heldout = [self_instruct_pair(user_tasks[i], "self_instruct_user_oriented") for i in sorted(heldout_user)]
    write_jsonl(out / "heldout.jsonl", heldout)
    user_oriented = "self_instruct_user_oriented"
    complex_rows = [complex_instruction(user_tasks[i], rng, user_oriented) for i in sorted(complex_user)]
    for i, row in enumerate(complex_rows):
        row["id"] = f"complex_{i:03d}"
    write_jsonl(out / "complex_instructions.jsonl", complex_rows)

    gsm_train = read_jsonl(src / "gsm8k_train.jsonl")
    picked = sorted(rng.sample(range(len(gsm_train)), N_UNLABELED))
    unlabeled = [
        {
            "response": gsm8k_solution(gsm_train[i]["answer"]),
            "reference_instruction": gsm_train[i]["question"],
            "source": f"gsm8k_train:{i}",
        }
        for i in picked
    ]
    write_jsonl(out / "unlabeled.jsonl", unlabeled)

    gsm_test = read_jsonl(src / "gsm8k_test.jsonl")
    write_jsonl(
        out / "eval" / "gsm8k_test.jsonl", [gsm_test[i] for i in sorted(rng.sample(range(len(gsm_test)), N_GSM8K_TEST))]
    )

    for subject in MMLU_SUBJECTS:
        for split, n in (("test", N_MMLU_PER_SUBJECT), ("dev", None)):
            with (src / "mmlu" / split / f"{subject}_{split}.csv").open(encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            header, body = rows[0], rows[1:]
            if n is not None:
                body = [body[i] for i in sorted(rng.sample(range(len(body)), n))]
            target = out / "eval" / "mmlu" / split / f"{subject}_{split}.csv"
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("w", encoding="utf-8", newline="") as f:
                csv.writer(f).writerows([header, *body])

    ifeval = read_jsonl(src / "ifeval_input_data.jsonl")
    write_jsonl(out / "eval" / "ifeval.jsonl", [ifeval[i] for i in sorted(rng.sample(range(len(ifeval)), N_IFEVAL))])
    humaneval = read_jsonl(src / "HumanEval.jsonl.gz")
    write_jsonl(
        out / "eval" / "humaneval.jsonl", [humaneval[i] for i in sorted(rng.sample(range(len(humaneval)), N_HUMANEVAL))]
    )

    # GSM8K few-shot examples (original format) for the offline gsm8k task, disjoint from `unlabeled`;
    # their own generator so that adding them left every other file unchanged
    rest = sorted(set(range(len(gsm_train))) - set(picked))
    fewshot = sorted(random.Random(f"{SEED}:gsm8k_fewshot").sample(rest, N_GSM8K_FEWSHOT))
    write_jsonl(out / "eval" / "gsm8k_train_fewshot.jsonl", [gsm_train[i] for i in fewshot])

    for path in sorted(out.rglob("*")):
        if path.is_file() and path.suffix in (".jsonl", ".csv"):
            with path.open(encoding="utf-8", newline="") as f:
                # CSV rows can span lines (quoted newlines), so count records, not lines; minus the header
                rows = sum(1 for _ in csv.reader(f)) - 1 if path.suffix == ".csv" else sum(1 for _ in f)
            files[str(path.relative_to(out))] = rows
    return files


def sources_md(files: dict[str, int], manifest: dict) -> str:
    lines = [
        "# Bundled data pack: sources",
        "",
        "Built by `scripts/build_bundled_data.py` (seed 0) from the public files in `$MAINLIB_DATA_DIR`; only",
        "MIT and Apache-2.0 sources. Every split is disjoint from the others, and the evaluation subsets are",
        "disjoint from everything trained on (GSM8K *test* for evaluation, GSM8K *train* solutions for the pool;",
        "different Self-Instruct tasks for seed / heldout / complex; IFEval, MMLU and HumanEval are only evaluated).",
        "",
        "| source file | origin repo : path | commit | licence | input sha256 |",
        "|---|---|---|---|---|",
    ]
    for name, (origin, commit, licence) in SOURCES.items():
        lines.append(f"| {name} | {origin} | {commit} | {licence} | {manifest['inputs'].get(name, '(folder)')} |")
    lines += [
        "",
        "| bundled file | rows | built from |",
        "|---|---|---|",
    ]
    built_from = {
        "seed.jsonl": "175 Self-Instruct seed tasks + 25 user-oriented tasks (first instance; input appended "
        "to the instruction)",
        "heldout.jsonl": "50 other user-oriented tasks, never trained on (ground-truth checks of the scorer)",
        "complex_instructions.jsonl": "100 other user-oriented tasks + 2-4 constraints each from a constraint "
        "bank written for this project (fields: task, input, constraints)",
        "unlabeled.jsonl": "500 GSM8K train solutions: `<<calc>>` annotations removed, `#### n` written as "
        "'The final answer is n.'; the question is kept as `reference_instruction`",
        "eval/gsm8k_test.jsonl": "100 GSM8K test problems, original format",
        "eval/gsm8k_train_fewshot.jsonl": "20 GSM8K train problems (none of them in unlabeled), original format: "
        "few-shot examples for the offline gsm8k task",
        "eval/ifeval.jsonl": "100 IFEval prompts, original format",
        "eval/humaneval.jsonl": "20 HumanEval problems, original format",
    }
    for name, rows in files.items():
        note = built_from.get(name, "MMLU subject subset (header question,choice0..3,answer; integer answers)")
        lines.append(f"| {name} | {rows} | {note} |")
    lines += ["", "File hashes are in `manifest.json`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR)
    args = parser.parse_args()
    src = data_dir()
    # Build into a temporary folder and swap it in at the end: a failed build leaves the old pack intact.
    tmp = Path(tempfile.mkdtemp(prefix=".bundled-", dir=args.out.parent))
    tmp.chmod(0o755)
    try:
        files = build(src, tmp)
        inputs = {name: sha256(src / name) for name in SOURCES if (src / name).is_file()}
        manifest = {
            "seed": SEED,
            "inputs": inputs,
            "rows": files,
            "sha256": {name: sha256(tmp / name) for name in files},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "SOURCES.md").write_text(sources_md(files, manifest))
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB):")
    for name, rows in files.items():
        print(f"  {name}: {rows} rows")


if __name__ == "__main__":
    main()
