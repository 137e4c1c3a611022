"""Benchmarks with lm-evaluation-harness (ALGORITHMS.md §4): MMLU, GSM8K, HumanEval, IFEval.

`evaluate(model, adapter, tasks, ...)` loads the model the way training does (4-bit on CUDA, full precision
on CPU; a mainlib adapter on top), wraps it in lm-eval's `HFLM` and calls `lm_eval.simple_evaluate`.

- `data="hub"`: lm-eval's built-in tasks (`mmlu`, `gsm8k`, `humaneval`, `ifeval`), which download their data.
- `data="bundled"` / `"full"`: the offline twins in `mainlib/tasks/` (same prompts, filters and metrics)
  over the bundled subsets or the full sets in $MAINLIB_DATA_DIR; nothing is downloaded.

Each (model, adapter, task) gets one JSON under `results/<run_name>/eval/`: lm-eval's own output for the
task, and summary rows (task, metric, value, stderr, n, model, adapter, seconds). The notebook 05 and the
CLI (`python -m mainlib.evaluate --help`) go through the same function, so they give the same numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from mainlib.execution import OPT_IN_MESSAGE, OPT_IN_VARIABLE, CodeExecutionNotAllowed
from mainlib.results import provenance, write_json

DataSource = Literal["hub", "bundled", "full"]
BENCHMARKS = ("mmlu", "gsm8k", "humaneval", "ifeval")

# lm-eval task (or group) name per benchmark and data source
TASK_NAMES: dict[str, dict[str, str]] = {
    "hub": {"mmlu": "mmlu", "gsm8k": "gsm8k", "humaneval": "humaneval", "ifeval": "ifeval"},
    "bundled": {
        "mmlu": "mainlib_mmlu_bundled",
        "gsm8k": "mainlib_gsm8k",
        "humaneval": "mainlib_humaneval",
        "ifeval": "mainlib_ifeval",
    },
    "full": {
        "mmlu": "mainlib_mmlu",
        "gsm8k": "mainlib_gsm8k",
        "humaneval": "mainlib_humaneval",
        "ifeval": "mainlib_ifeval",
    },
}

# The number each benchmark is reported by (the rest of lm-eval's metrics stay in the JSON)
HEADLINE = {
    "mmlu": "acc,none",
    "gsm8k": "exact_match,flexible-extract",
    "humaneval": "pass@1,create_test",
    "ifeval": "prompt_level_strict_acc,none",
}


def default_data() -> DataSource:
    """`hub` (lm-eval's own tasks) on a GPU box, `bundled` (offline, small) on CPU."""
    import torch

    return "hub" if torch.cuda.is_available() else "bundled"


def task_name(benchmark: str, data: DataSource) -> str:
    if data not in TASK_NAMES:
        raise ValueError(f"data must be one of {', '.join(TASK_NAMES)}; got {data!r}")
    if benchmark in TASK_NAMES[data]:
        return TASK_NAMES[data][benchmark]
    return benchmark  # any other lm-eval task or group name passes through


@contextmanager
def code_execution(allowed: bool):
    """Set the opt-in for model-written code (HumanEval) for the duration of the evaluation."""
    before = os.environ.get(OPT_IN_VARIABLE)
    if allowed:
        os.environ[OPT_IN_VARIABLE] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(OPT_IN_VARIABLE, None)
        else:
            os.environ[OPT_IN_VARIABLE] = before


def _label(model: str, adapter: str | None) -> str:
    """A file-name-safe name for a (model, adapter) pair: the model's name, or the adapter's last three folders."""
    text = "_".join(Path(adapter).resolve().parts[-3:]) if adapter else Path(model).name or model
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[-80:] or "model"


def summary_rows(output: dict[str, Any], benchmark: str, task: str) -> list[dict[str, Any]]:
    """One row per metric of `task` (or of the group and its members) from lm-eval's results."""
    rows = []
    samples = output.get("n-samples", {})
    for name, metrics in output["results"].items():
        if name != task and not (output.get("group_subtasks", {}).get(task) and name in output["group_subtasks"][task]):
            continue
        n = samples.get(name, {}).get("effective")
        if name == task and n is None:  # a group: the sum over its members
            n = sum(samples.get(m, {}).get("effective", 0) for m in output.get("group_subtasks", {}).get(task, []))
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr," in key or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(
                {
                    "benchmark": benchmark,
                    "task": name,
                    "metric": metric,
                    "filter": filter_name,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, int | float) and not math.isnan(stderr) else None,
                    "n": n,
                    "headline": name == task and key == HEADLINE.get(benchmark),
                }
            )
    return rows


def evaluate(
    model: str,
    adapter: str | None = None,
    tasks: Sequence[str] = BENCHMARKS,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = "auto",
    allow_code_execution: bool = False,
    data: DataSource | None = None,
    run_name: str = "eval",
    results_dir: str | Path = "results",
    quantization: str = "auto",
    max_gen_toks: int | None = None,
    apply_chat_template: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Evaluate `model` (+ `adapter`) on each benchmark; write one JSON per task; return the summary rows.

    `data` None means `default_data()`: the hub tasks on CUDA, the bundled offline tasks on CPU. `limit` caps
    the documents per task (an int, or a fraction); `max_gen_toks` caps generation length for every
    generative task (None keeps lm-eval's per-task settings: use it for quick CPU runs only).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mainlib.models import load_adapter, load_model, load_tokenizer
    from mainlib.nltk_data import ensure_punkt
    from mainlib.tasks import TASKS_DIR

    data = data or default_data()
    names = {b: task_name(b, data) for b in tasks}
    if "humaneval" in tasks and not allow_code_execution and os.environ.get(OPT_IN_VARIABLE) != "1":
        raise CodeExecutionNotAllowed(OPT_IN_MESSAGE)
    if "ifeval" in tasks:
        ensure_punkt()
    if adapter:
        lm_model, tokenizer, _ = load_adapter(adapter, quantization)
    else:
        lm_model, tokenizer = load_model(model, quantization), load_tokenizer(model)
    lm_model.eval()
    lm = HFLM(pretrained=lm_model, tokenizer=tokenizer, batch_size=batch_size)
    metadata = {"mainlib_source": data} if data != "hub" else None
    manager = TaskManager(include_path=str(TASKS_DIR) if data != "hub" else None, metadata=metadata)
    gen_kwargs = {"max_gen_toks": max_gen_toks} if max_gen_toks else None

    out_dir = Path(results_dir) / run_name / "eval"
    rows: list[dict[str, Any]] = []
    for benchmark, task in names.items():
        start = time.perf_counter()
        with code_execution(allow_code_execution):
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                gen_kwargs=gen_kwargs,
                apply_chat_template=apply_chat_template,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                confirm_run_unsafe_code=allow_code_execution,
            )
        seconds = time.perf_counter() - start
        task_rows = [
            {**r, "model": model, "adapter": adapter, "data": data, "seconds": seconds}
            for r in summary_rows(output, benchmark, task)
        ]
        rows += task_rows
        settings = {
            "model": model,
            "adapter": adapter,
            "task": task,
            "data": data,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "max_gen_toks": max_gen_toks,
            "apply_chat_template": apply_chat_template,
            "seed": seed,
        }
        lm_eval_output = {
            k: output.get(k)
            for k in (
                "results",
                "groups",
                "group_subtasks",
                "configs",
                "versions",
                "n-shot",
                "higher_is_better",
                "n-samples",
            )
        }
        write_json(
            out_dir / f"{_label(model, adapter)}__{benchmark}.json",
            {
                "settings": settings,
                "summary": task_rows,
                "seconds": seconds,
                "lm_eval": lm_eval_output,
                "provenance": provenance(),
            },
        )
    return rows


def compare(
    model: str,
    adapters: Mapping[str, str | None],
    tasks: Sequence[str] = BENCHMARKS,
    **settings: Any,
) -> list[dict[str, Any]]:
    """The same evaluation for each labelled adapter (None = the base model); rows carry their `label`.

    An adapter directory that does not exist is skipped with a message (e.g. a stage not run yet).
    """
    rows = []
    for label, adapter in adapters.items():
        if adapter is not None and not Path(adapter).is_dir():
            print(f"[{label}] skipped: {adapter} does not exist (run the notebook that trains it first)")
            continue
        rows += [{**r, "label": label} for r in evaluate(model, adapter, tasks, **settings)]
    return rows


def headline_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per model label, one column per benchmark: `value ± stderr` of the headline metric (n)."""
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r["headline"]:
            continue
        cell = f"{r['value']:.3f}" + (f" ± {r['stderr']:.3f}" if r.get("stderr") is not None else "")
        table.setdefault(r.get("label", r["adapter"] or r["model"]), {})[
            f"{r['benchmark']} ({r['metric']}, n={r['n']})"
        ] = cell
    return [{"model": label, **cells} for label, cells in table.items()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mainlib.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="bundled key, local folder or hub id")
    parser.add_argument("--adapter", default=None, help="a mainlib adapter directory (e.g. runs/x/final_sft/model)")
    parser.add_argument("--tasks", default=",".join(BENCHMARKS), help="comma-separated: mmlu,gsm8k,humaneval,ifeval")
    parser.add_argument(
        "--data",
        default=None,
        choices=list(TASK_NAMES),
        help="hub, bundled or full (default: hub on CUDA, else bundled)",
    )
    parser.add_argument("--limit", type=float, default=None, help="documents per task (>= 1) or a fraction (< 1)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="cap generation length (quick runs)")
    parser.add_argument("--quantization", default="auto", choices=["auto", "4bit", "none"])
    parser.add_argument("--apply-chat-template", action="store_true")
    parser.add_argument("--allow-code-execution", action="store_true", help="needed for humaneval")
    parser.add_argument("--run-name", default="eval")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    rows = evaluate(
        args.model,
        args.adapter,
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        limit=limit,
        num_fewshot=args.num_fewshot,
        batch_size=batch_size,
        allow_code_execution=args.allow_code_execution,
        data=args.data,
        run_name=args.run_name,
        results_dir=args.results_dir,
        quantization=args.quantization,
        max_gen_toks=args.max_gen_toks,
        apply_chat_template=args.apply_chat_template,
        seed=args.seed,
    )
    from mainlib.results import markdown_table

    print(
        markdown_table(
            [{k: r[k] for k in ("task", "metric", "filter", "value", "stderr", "n")} for r in rows if r["headline"]]
        )
    )


if __name__ == "__main__":
    main()
