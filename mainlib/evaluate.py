"""Benchmarks with lm-evaluation-harness (ALGORITHMS.md §4): MMLU, GSM8K, HumanEval, IFEval.

`compare(model, {label: adapter_or_None}, tasks, **settings)` loads the base model once (4-bit on CUDA, full
precision on CPU), puts every adapter on it as a named peft adapter, and runs `lm_eval.simple_evaluate` for
each label with that adapter active (the base: all adapters disabled). `evaluate(model, adapter, ...)` is
the one-model case. Settings are `EvalSettings` (the one list of what can be set: function, CLI, notebook 05).

- Chat template: `apply_chat_template="auto"` uses it when the tokenizer has one (instruct models, and the
  adapters trained on them), with few-shot examples as a multi-turn chat, as lm-eval recommends.
- Generation: lm-eval's per-task settings (IFEval 1,280 new tokens, GSM8K's stop sequences); `max_gen_toks`
  caps them only when set, and every table then says so. Greedy generation runs through `mainlib.lm`
  (continuous batching: the same outputs, several times faster when some answers run to the cap).
- `data="hub"`: lm-eval's built-in tasks (they download); `"bundled"` / `"full"`: the offline twins in
  `mainlib/tasks/` over the bundled subsets or `$MAINLIB_DATA_DIR`.

Backends (`backend`, default `auto`):
- `hf`, one process: the base loaded once, adapters switched on it, `mainlib.lm.ContinuousHFLM` around it;
  on CPU each adapter runs merged into a copy of the base (`shared_base_lms`).
- `hf`, several processes (`accelerate launch --num_processes N -m mainlib.evaluate ...`, or torchrun):
  lm-eval's own data parallelism. It needs the model loaded by lm-eval from its name, so each label gets an
  HFLM with `pretrained=` the base and `peft=` the adapter; lm-eval shards the documents over the processes
  and gathers results on rank 0, which alone writes files and returns rows (the others return []). It runs
  on CPU too (gloo; `accelerate launch --multi_gpu` on a CPU box, or torchrun: `accelerate launch --cpu`
  starts one process), see `mainlib.lm.ContinuousHFLM._join_process_group`.
- `vllm` (auto picks it when vllm is installed, CUDA is available and one process runs): lm-eval's `vllm`
  model, one engine per label, each adapter served as a LoRA; `gpu_memory_utilization`,
  `tensor_parallel_size`, `data_parallel_size` go to vLLM.

Each (label, task) gets one JSON under `results/<run_name>/eval/`: the settings as used, lm-eval's own output,
response-length statistics of generative tasks, and summary rows (task, metric, value, stderr, n, seconds).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mainlib.execution import OPT_IN_MESSAGE, OPT_IN_VARIABLE, CodeExecutionNotAllowed
from mainlib.results import provenance, write_json, write_jsonl

DataSource = Literal["hub", "bundled", "full"]
Backend = Literal["hf", "vllm"]
BACKENDS = ("auto", "hf", "vllm")
# what vLLM's LoRA config accepts as max_lora_rank (1, 8, 16, ..., 512); 1 is left out, 8 covers it
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
BENCHMARKS = ("mmlu", "gsm8k", "humaneval", "ifeval")

# lm-eval task (or group) name per benchmark and data source
TASK_NAMES: dict[str, dict[str, str]] = {
    "hub": {
        "mmlu": "mmlu",
        "mmlu_cloze": "mmlu_continuation",
        "gsm8k": "gsm8k",
        "humaneval": "humaneval",
        "ifeval": "ifeval",
    },
    "bundled": {
        "mmlu": "mainlib_mmlu_bundled",
        "mmlu_cloze": "mainlib_mmlu_cloze_bundled",
        "gsm8k": "mainlib_gsm8k",
        "humaneval": "mainlib_humaneval",
        "ifeval": "mainlib_ifeval",
    },
    "full": {
        "mmlu": "mainlib_mmlu",
        "mmlu_cloze": "mainlib_mmlu_cloze",
        "gsm8k": "mainlib_gsm8k",
        "humaneval": "mainlib_humaneval",
        "ifeval": "mainlib_ifeval",
    },
}

# `mmlu_cloze` (the answer text is scored, not its letter) is the form small models' cards report MMLU in.
# The number each benchmark is reported by (the rest of lm-eval's metrics stay in the JSON)
HEADLINE = {
    "mmlu": "acc,none",
    "mmlu_cloze": "acc_norm,none",
    "gsm8k": "exact_match,flexible-extract",
    "humaneval": "pass@1,create_test",
    "ifeval": "prompt_level_strict_acc,none",
}


@dataclass
class EvalSettings:
    """What an evaluation can be told; the function, the CLI and notebook 05 all go through this."""

    tasks: list[str] = field(
        default_factory=lambda: list(BENCHMARKS),
        metadata={"help": "benchmarks (mmlu, gsm8k, humaneval, ifeval) or any lm-eval task/group name"},
    )
    data: str | None = field(default=None, metadata={"help": "hub, bundled or full; None: hub on CUDA, bundled on CPU"})
    limit: int | float | None = field(
        default=None, metadata={"help": "documents per task (an int >= 1) or a share (a float, 0 < f < 1); None: all"}
    )
    num_fewshot: int | None = field(default=None, metadata={"help": "None: each task's own (GSM8K 5, MMLU 0)"})
    batch_size: int | str = field(
        default="auto", metadata={"help": "lm-eval batch size (an int or 'auto': lm-eval's probe on CUDA, 8 on CPU)"}
    )
    max_gen_toks: int | None = field(
        default=None,
        metadata={"help": "cap on new tokens for every generative task; None keeps lm-eval's per-task settings"},
    )
    apply_chat_template: bool | str = field(
        default="auto",
        metadata={"help": "'auto' (when the tokenizer has a chat template), True or False"},
    )
    headline: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "benchmark -> 'metric,filter' reported in tables (overrides HEADLINE)"},
    )
    generation_slots: int = field(
        default=16,
        metadata={"help": "rows decoded together in greedy generation (continuous batching); 0: lm-eval's own"},
    )
    quantization: str = field(
        default="auto",
        metadata={
            "help": "auto (hf: 4-bit on CUDA, bf16 weights on a CPU with bf16 matmuls, else none; vllm: none), "
            "4bit, bf16 or none"
        },
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "hf, vllm, or auto: vllm when the vllm package is installed, CUDA is available and the run is "
            "one process; under accelerate launch / torchrun hf runs data-parallel (see the module docstring)"
        },
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vllm: share of each GPU's memory vLLM takes for weights and KV cache"}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs each copy of the model is split over"})
    data_parallel_size: int = field(
        default=1,
        metadata={
            "help": "vllm: copies of the model, each on tensor_parallel_size GPUs (needs ray); "
            "hf runs data-parallel under accelerate launch --num_processes N instead"
        },
    )
    allow_code_execution: bool = field(default=False, metadata={"help": "needed for humaneval (runs model code)"})
    seed: int = field(default=0, metadata={"help": "lm-eval's python / numpy / torch / few-shot seeds"})
    run_name: str = field(default="eval", metadata={"help": "results go to <results_dir>/<run_name>/eval/"})
    results_dir: str = field(default="results", metadata={"help": "where result JSON is written"})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "lm-eval request cache (sqlite, one per model and adapter): a rerun resumes there"},
    )
    samples_dir: str | None = field(
        default=None, metadata={"help": "write each document's responses and metrics here (JSONL); None: don't"}
    )

    def __post_init__(self) -> None:
        from mainlib.models import QUANTIZATIONS

        _check_choice("data", self.data, (None, *TASK_NAMES))
        _check_choice("apply_chat_template", self.apply_chat_template, ("auto", True, False))
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice("backend", self.backend, BACKENDS)
        for name in RULES:
            check_setting(name, getattr(self, name))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# name -> (test, what is allowed): checked when settings are made (function, notebook 05) and per CLI option,
# so a value lm-eval would misread (limit 1.0: one document; num_fewshot -1: zero-shot recorded as -1 shots)
# or refuse only after the model has loaded (a negative seed) is an error before anything loads
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tasks": (
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(t, str) and t for t in v),
        "a non-empty list of names",
    ),
    "limit": (
        lambda v: v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v < 1),
        "an int >= 1 (documents per task) or a float in (0, 1) (that share of each task), or None (all); "
        "lm-eval reads a float >= 1 as int(limit) documents",
    ),
    "num_fewshot": (lambda v: v is None or (_is_int(v) and v >= 0), "an int >= 0 or None"),
    "batch_size": (lambda v: (isinstance(v, str) and v == "auto") or (_is_int(v) and v >= 1), "an int >= 1 or 'auto'"),
    "max_gen_toks": (lambda v: v is None or (_is_int(v) and v >= 1), "an int >= 1 or None"),
    "generation_slots": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an int in [0, 2**32)"),
    "headline": (
        lambda v: isinstance(v, dict) and all(isinstance(x, str) for kv in v.items() for x in kv),
        "a mapping benchmark -> 'metric,filter'",
    ),
    "allow_code_execution": (lambda v: isinstance(v, bool), "True or False"),  # "false" would be truthy
    "gpu_memory_utilization": (
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1,
        "a number in (0, 1]",
    ),
    "tensor_parallel_size": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "data_parallel_size": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
}


def check_setting(name: str, value: Any) -> None:
    """One setting against its rule in `RULES`; the error names the setting and what is allowed."""
    test, allowed = RULES[name]
    if not test(value):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if not any(value is a or (isinstance(value, str) and value == a) for a in allowed):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


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


def uses_chat_template(tokenizer: Any, setting: bool | str) -> bool:
    """`auto` -> whether the tokenizer has a chat template; True/False force it (True needs one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting == "auto":
        return has_template
    if setting and not has_template:
        raise ValueError("apply_chat_template=True, but the tokenizer has no chat template; use 'auto' or False")
    return bool(setting)


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


CPU_AUTO_BATCH_SIZE = 8


def resolve_batch_size(setting: int | str, device: Any) -> int | str:
    """lm-eval's "auto" tries ever larger batches until one fails. On CUDA that failure is an exception it
    catches; on CPU it is the kernel's OOM killer (57 MMLU subjects at batch 64 used 23 GB and were killed),
    so "auto" on CPU is a fixed batch that fits long documents."""
    return CPU_AUTO_BATCH_SIZE if setting == "auto" and getattr(device, "type", str(device)) == "cpu" else setting


def process_count() -> int:
    """How many processes evaluate together: WORLD_SIZE, which accelerate launch and torchrun set."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_backend(s: EvalSettings) -> Backend:
    """The backend `s.backend` means on this machine and launch; a combination that cannot run is an error
    before anything loads."""
    import torch

    from mainlib.generate import vllm_available

    backend = s.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() and torch.cuda.is_available() and process_count() == 1 else "hf"
    if backend == "vllm" and not vllm_available():
        raise ModuleNotFoundError("backend='vllm' needs the vllm package (CUDA only): pip install vllm; or use 'hf'")
    if backend == "vllm" and process_count() > 1:
        raise ValueError(
            "backend='vllm' runs as one process and spreads over GPUs itself (tensor_parallel_size, "
            "data_parallel_size): launch it without accelerate launch / torchrun, or use backend='hf'"
        )
    if backend == "hf" and (s.tensor_parallel_size > 1 or s.data_parallel_size > 1):
        raise ValueError(
            "tensor_parallel_size and data_parallel_size must be 1 with backend='hf' (they are vllm settings); "
            "hf runs data-parallel under accelerate launch --num_processes N"
        )
    return backend


def vllm_lora_rank(adapter: str) -> int:
    """vLLM's `max_lora_rank` for an adapter: the smallest value it accepts that holds every rank in the adapter."""
    import json

    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    rank = max([int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())])
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"adapter {adapter}: LoRA rank {rank} is above vLLM's largest max_lora_rank, 512")
    return fits[0]


def _label(model: str, adapter: str | None) -> str:
    """A file-name-safe name for a (model, adapter) pair: the model's name, or the adapter's last three folders."""
    text = "_".join(Path(adapter).resolve().parts[-3:]) if adapter else Path(model).name or model
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[-80:] or "model"


# --------------------------------------------------------------------------------------------------
# Checks before any model is loaded
# --------------------------------------------------------------------------------------------------


def check_tasks(names: Sequence[str], known: Sequence[str]) -> None:
    """Every task must be one lm-eval knows; the error lists the benchmarks and the closest known names."""
    known_set = set(known)
    for name in names:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=5)
            raise ValueError(
                f"unknown task {name!r}. Benchmarks: {', '.join(TASK_NAMES['hub'])}"
                + (f"; closest lm-eval tasks: {', '.join(close)}" if close else "")
                + " (any lm-eval task or group name is accepted)"
            )


def _same_model(a: str, b: str) -> bool:
    from mainlib.models import BUNDLED_MODELS

    if a == b:
        return True
    if a in BUNDLED_MODELS or b in BUNDLED_MODELS:
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_adapters(model: str, adapters: Mapping[str, str | None]) -> None:
    """Each adapter folder exists, was saved by mainlib, and was trained on `model`."""
    from mainlib.models import read_adapter_config

    for label, adapter in adapters.items():
        if adapter is None:
            continue
        base = read_adapter_config(adapter).get("base_model")
        if not _same_model(str(base), model):
            raise ValueError(f"adapter {label!r} ({adapter}) was trained on {base!r}, not on {model!r}")


def check_inputs(model: str, adapters: Mapping[str, str | None], s: EvalSettings) -> None:
    """What can be wrong before anything is loaded (task names are checked once lm-eval has indexed them)."""
    from mainlib.models import check_model_available

    if not adapters:
        raise ValueError("adapters is empty: give at least one label (None is the base model)")
    if "humaneval" in s.tasks and not s.allow_code_execution and os.environ.get(OPT_IN_VARIABLE) != "1":
        raise CodeExecutionNotAllowed(OPT_IN_MESSAGE)
    check_model_available(model)
    check_adapters(model, adapters)


# --------------------------------------------------------------------------------------------------
# The lm-eval model of each label: one base with many adapters, one model per label (data-parallel hf, vllm)
# --------------------------------------------------------------------------------------------------

LabelledLM = tuple[str, str | None, Any]  # (label, adapter or None, an lm-eval LM in that model state)


def attach_adapters(base: Any, adapters: Mapping[str, str | None]) -> tuple[Any, dict[str, str | None]]:
    """Load every adapter onto `base` as a named peft adapter; returns (model, label -> adapter name or None)."""
    from peft import PeftModel

    model, names = base, {}
    for k, (label, path) in enumerate(adapters.items()):
        if path is None:
            names[label] = None
            continue
        names[label] = f"adapter_{k}"  # peft names are module keys: the labels may not be valid ones
        if model is base:
            model = PeftModel.from_pretrained(base, path, adapter_name=names[label])
        else:
            model.load_adapter(path, adapter_name=names[label])
    model.eval()
    return model, names


@contextmanager
def active_adapter(model: Any, name: str | None) -> Iterator[None]:
    """Run with adapter `name` active, or with every adapter disabled (the base model) when `name` is None."""
    if name is None:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            yield
    else:
        model.set_adapter(name)
        yield


def shared_base_lms(
    model: str, adapters: Mapping[str, str | None], s: EvalSettings, tokenizer: Any
) -> Iterator[LabelledLM]:
    """One process: the base loaded once, every adapter a named peft adapter on it, each made active in turn.

    On CPU an adapter is evaluated on a copy with it merged into the base's weights (`merged_for_inference`): no
    LoRA matmuls per token, 1.22x the generation speed of the adapter on the base (`python -m bench generate`,
    variants `merged_hf` and `hf`), for one more copy of the base while that label runs. GPUs keep the 4-bit base
    the adapter was trained on, which a merged copy would not be."""
    from mainlib.generate import merged_for_inference, merges
    from mainlib.lm import ContinuousHFLM
    from mainlib.models import load_model

    base, names = attach_adapters(load_model(model, s.quantization).eval(), adapters)
    batch_size = resolve_batch_size(s.batch_size, base.device)

    def lm_of(model: Any) -> Any:
        return ContinuousHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, slots=s.generation_slots)

    shared = lm_of(base)
    for label, adapter in adapters.items():
        with active_adapter(base, names[label]):
            if names[label] is None or not merges(None, base):
                yield label, adapter, shared
                continue
            merged = lm_of(merged_for_inference(base))
            yield label, adapter, merged
            del merged
            free_memory()


def free_memory() -> None:
    """Let the last label's model go before the next one loads (one copy of the base in memory at a time)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def one_lm_per_label(adapters: Mapping[str, str | None], build: Callable[[str | None], Any]) -> Iterator[LabelledLM]:
    """`build(adapter)` per label; the caller drops its reference before asking for the next."""
    for label, adapter in adapters.items():
        lm = build(adapter)
        yield label, adapter, lm
        del lm
        free_memory()


def data_parallel_lms(
    model: str, adapters: Mapping[str, str | None], s: EvalSettings, tokenizer: Any
) -> Iterator[LabelledLM]:
    """Several processes (accelerate launch, torchrun): lm-eval's own data parallelism, which needs HFLM to
    load the model from a name (`pretrained=`, the adapter as `peft=`); each process holds a whole copy.

    Without CUDA the processes can only meet over gloo on CPU, and accelerate forms a CPU process group only
    when told to (ACCELERATE_USE_CPU, accelerate/state.py:915 and 802-813), so it is set here.
    """
    from mainlib.lm import ContinuousHFLM
    from mainlib.models import (
        attention_implementation,
        default_device,
        quantization_config,
        resolve_model,
        weights_dtype,
    )

    device = default_device()
    if device.type == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    attention = attention_implementation(device)
    load = {
        "pretrained": resolve_model(model),
        "tokenizer": tokenizer,
        "dtype": weights_dtype(s.quantization, device),
        "quantization_config": quantization_config(s.quantization, device),
        "batch_size": resolve_batch_size(s.batch_size, device),
        "slots": s.generation_slots,
        **({"attn_implementation": attention} if attention else {}),
    }
    return one_lm_per_label(adapters, lambda adapter: ContinuousHFLM(peft=adapter, **load))


def vllm_lms(model: str, adapters: Mapping[str, str | None], s: EvalSettings) -> Iterator[LabelledLM]:
    """lm-eval's `vllm` model, one engine per label; an adapter is served as a LoRA (`lora_local_path`)."""
    from lm_eval.api.registry import get_model

    from mainlib.models import resolve_model

    vllm_lm = get_model("vllm")
    engine = {
        "pretrained": resolve_model(model),
        "dtype": "bfloat16" if s.quantization == "bf16" else "auto",
        "quantization": "bitsandbytes" if s.quantization == "4bit" else None,
        "batch_size": s.batch_size,
        "seed": s.seed,
        "gpu_memory_utilization": s.gpu_memory_utilization,
        "tensor_parallel_size": s.tensor_parallel_size,
        "data_parallel_size": s.data_parallel_size,
    }

    def build(adapter: str | None) -> Any:
        if adapter is None:
            return vllm_lm(**engine)
        return vllm_lm(**engine, enable_lora=True, max_lora_rank=vllm_lora_rank(adapter), lora_local_path=adapter)

    return one_lm_per_label(adapters, build)


def label_lms(model: str, adapters: Mapping[str, str | None], s: EvalSettings, tokenizer: Any) -> Iterator[LabelledLM]:
    """The lm-eval model of each label for the resolved backend and the number of processes."""
    if s.backend == "vllm":
        return vllm_lms(model, adapters, s)
    if process_count() > 1:
        return data_parallel_lms(model, adapters, s, tokenizer)
    return shared_base_lms(model, adapters, s, tokenizer)


def model_fingerprint(model: str, adapter: str | None, quantization: str) -> str:
    """Names an lm-eval request cache: its keys are the requests only, so each model state needs its own file (the
    weights' dtype is part of that state: `auto` loads bf16 on one CPU and fp32 on another)."""
    from mainlib.models import default_device, weights_dtype

    dtype = weights_dtype(quantization, default_device())  # type: ignore[arg-type]
    digest = hashlib.sha256(f"{model}|{quantization}|{dtype}".encode())
    if adapter:
        for path in sorted(Path(adapter).glob("adapter_model.*")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Rows, standard errors and response statistics from lm-eval's output
# --------------------------------------------------------------------------------------------------


def bootstrap_stderr(values: Sequence[Any], seed: int = 0) -> float | None:
    """Standard error of a metric lm-eval gives none for, by bootstrap over documents.

    Instruction-level IFEval accuracy is sum(followed) / sum(instructions) over the documents' lists; the
    instructions of one prompt are not independent, so documents (clusters) are resampled, not instructions.
    """
    import numpy as np
    from scipy.stats import bootstrap

    if len(values) < 2:
        return None
    if isinstance(values[0], list | tuple):
        hits = np.array([sum(map(float, v)) for v in values])
        totals = np.array([len(v) for v in values], dtype=float)
        data, statistic = (hits, totals), lambda h, t, axis=-1: h.sum(axis) / t.sum(axis)
    else:
        data, statistic = (np.array(values, dtype=float),), lambda x, axis=-1: x.mean(axis)
    result = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=2000, method="percentile", rng=seed)
    return float(result.standard_error)


def _member_tasks(output: dict[str, Any], task: str) -> list[str]:
    return list(output.get("group_subtasks", {}).get(task, []))


def summary_rows(output: dict[str, Any], benchmark: str, task: str, headline: str) -> list[dict[str, Any]]:
    """One row per metric of `task` (or of the group and its members) from lm-eval's results."""
    rows = []
    samples, members = output.get("n-samples", {}), _member_tasks(output, task)
    for name, metrics in output["results"].items():
        if name != task and name not in members:
            continue
        n = samples.get(name, {}).get("effective")
        if name == task and n is None:  # a group: the sum over its members
            n = sum(samples.get(m, {}).get("effective", 0) for m in members)
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr," in key or not isinstance(value, int | float):
                continue
            metric, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            if not isinstance(stderr, int | float) or math.isnan(stderr):
                per_doc = [
                    s[metric]
                    for s in output.get("samples", {}).get(name, [])
                    if metric in s and s.get("filter", filter_name) == filter_name
                ]
                stderr = bootstrap_stderr(per_doc)
            rows.append(
                {
                    "benchmark": benchmark,
                    "task": name,
                    "metric": metric,
                    "filter": filter_name,
                    "value": float(value),
                    "stderr": None if stderr is None else float(stderr),
                    "n": n,
                    "headline": name == task and key == headline,
                }
            )
    return rows


def generation_cap(output: dict[str, Any], task: str, override: int | None) -> int | None:
    """The max new tokens the task ran with (lm-eval's default 256 when its config names none); None if it
    is not generative."""
    config = output.get("configs", {}).get(task, {})
    if config.get("output_type") != "generate_until":
        return None
    return override or int(config.get("generation_kwargs", {}).get("max_gen_toks", 256))


def response_stats(samples: Sequence[dict[str, Any]], tokenizer: Any, cap: int | None) -> dict[str, Any] | None:
    """Length of the generated responses in tokens, and how many ran into the cap (cut, not finished)."""
    import numpy as np

    by_doc = {s["doc_id"]: s["resps"][0][0] for s in samples if s.get("resps") and isinstance(s["resps"][0][0], str)}
    responses = list(by_doc.values())  # one per document (lm-eval repeats a sample for each filter)
    if not responses:
        return None
    lengths = np.array([len(tokenizer(r, add_special_tokens=False).input_ids) for r in responses])
    return {
        "n": len(responses),
        "mean_tokens": float(lengths.mean()),
        "median_tokens": float(np.median(lengths)),
        "max_tokens": int(lengths.max()),
        "cap": cap,
        "at_cap": int((lengths >= cap - 1).sum()) if cap else None,  # -1: a stop string may be cut off the end
        "empty": int(sum(not r.strip() for r in responses)),
    }


def in_document_order(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval logs a task's samples filter by filter, each in document order; gathered from several processes
    they come process by process. One order for both, so files and bootstrap errors do not depend on the launch."""
    filters = list(dict.fromkeys(s.get("filter") for s in samples))
    return sorted(samples, key=lambda s: (filters.index(s.get("filter")), s["doc_id"]))


def sample_records(output: dict[str, Any], names: Sequence[str]) -> list[dict[str, Any]]:
    """Each document's responses and metrics (no prompts: they are rebuilt from the task and doc_id)."""
    keep = ("doc_id", "target", "resps", "filtered_resps", "filter")
    metric_names = {k.partition(",")[0] for n in names for k in output["results"].get(n, {})}
    return [
        {"task": name, **{k: s[k] for k in keep if k in s}, **{m: s[m] for m in metric_names if m in s}}
        for name in names
        for s in output.get("samples", {}).get(name, [])
    ]


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def portable(value: Any) -> Any:
    """lm-eval's output with the machine's path to mainlib's task files made relative (`mainlib/tasks/...`)."""
    from mainlib.tasks import TASKS_DIR

    root = str(TASKS_DIR.parent.parent) + os.sep
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    return value.removeprefix(root) if isinstance(value, str) else value


LM_EVAL_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples")


def _run_task(lm: Any, task: str, s: EvalSettings, chat: bool, manager: Any, cache: str | None) -> dict[str, Any]:
    import lm_eval

    with code_execution(s.allow_code_execution):
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            num_fewshot=s.num_fewshot,
            limit=s.limit,
            task_manager=manager,
            gen_kwargs={"max_gen_toks": s.max_gen_toks} if s.max_gen_toks else None,
            apply_chat_template=chat,
            fewshot_as_multiturn=chat,
            use_cache=cache,
            log_samples=True,
            random_seed=s.seed,
            numpy_random_seed=s.seed,
            torch_random_seed=s.seed,
            fewshot_random_seed=s.seed,
            confirm_run_unsafe_code=s.allow_code_execution,
        )


def _evaluate_label(
    lm: Any,
    tokenizer: Any,
    model: str,
    label: str,
    adapter: str | None,
    names: Mapping[str, str],
    s: EvalSettings,
    chat: bool,
    manager: Any,
) -> list[dict[str, Any]]:
    """Every task for one (already active) model state; one JSON per task."""
    out_dir = Path(s.results_dir) / s.run_name / "eval"
    cache = None
    if s.cache_dir:
        cache = str(Path(s.cache_dir) / f"{_label(model, adapter)}-{model_fingerprint(model, adapter, s.quantization)}")
    used = {"apply_chat_template": chat, "fewshot_as_multiturn": chat}
    rows: list[dict[str, Any]] = []
    for benchmark, task in names.items():
        start = time.perf_counter()
        output = _run_task(lm, task, s, chat, manager, cache)
        seconds = time.perf_counter() - start
        if output is None:  # not rank 0 of a data-parallel run: rank 0 gathers, reports and writes
            continue
        output["samples"] = {name: in_document_order(v) for name, v in output.get("samples", {}).items()}
        members = _member_tasks(output, task) or [task]
        cap = generation_cap(output, members[0], s.max_gen_toks)
        context = {"model": model, "adapter": adapter, "label": label, "data": s.data, "seconds": seconds, **used}
        context |= {"max_gen_toks": cap, "capped": bool(cap and s.max_gen_toks)}
        headline = s.headline.get(benchmark, HEADLINE.get(benchmark, ""))
        task_rows = [{**r, **context} for r in summary_rows(output, benchmark, task, headline)]
        rows += task_rows
        stats = {m: response_stats(output.get("samples", {}).get(m, []), tokenizer, cap) for m in members}
        stem = f"{_label(model, adapter)}__{benchmark}"
        if s.samples_dir:
            write_jsonl(Path(s.samples_dir) / f"{stem}.jsonl", sample_records(output, members))
        record = {
            "settings": {**asdict(s), "model": model, "adapter": adapter, "label": label, "task": task, **used}
            | {"processes": process_count()},
            "summary": task_rows,
            "seconds": seconds,
            "responses": {m: v for m, v in stats.items() if v},
            "lm_eval": portable({k: output.get(k) for k in LM_EVAL_KEYS}),
            "provenance": provenance(),
        }
        write_json(out_dir / f"{stem}.json", record)
    return rows


def compare(
    model: str,
    adapters: Mapping[str, str | None],
    tasks: Sequence[str] = BENCHMARKS,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Evaluate the base `model` with each labelled adapter (None = the base itself); in one hf process the
    base is loaded once (data-parallel hf and vllm build one model per label, see the module docstring).

    Rows carry their `label`. Everything that can be checked (model name, adapter folders and their base
    model, task names, the HumanEval opt-in, every setting, the backend) is checked before the model is loaded.
    In a data-parallel run only rank 0 writes files and returns rows; the other processes return [].
    """
    from lm_eval.tasks import TaskManager

    from mainlib.models import load_tokenizer
    from mainlib.nltk_data import ensure_punkt
    from mainlib.tasks import TASKS_DIR

    s = EvalSettings(tasks=list(tasks), **settings)
    s.data = s.data or default_data()
    s.backend = resolve_backend(s)
    check_inputs(model, adapters, s)
    offline = s.data != "hub"
    manager = TaskManager(
        include_path=str(TASKS_DIR) if offline else None, metadata={"mainlib_source": s.data} if offline else None
    )
    names = {b: task_name(b, s.data) for b in s.tasks}
    check_tasks(list(names.values()), manager.all_tasks)
    tokenizer = load_tokenizer(model)
    chat = uses_chat_template(tokenizer, s.apply_chat_template)
    if "ifeval" in s.tasks:
        ensure_punkt()
    rows = []
    for label, adapter, lm in label_lms(model, adapters, s, tokenizer):
        rows += _evaluate_label(lm, tokenizer, model, label, adapter, names, s, chat, manager)
        del lm  # so that a model built per label is freed before the next one loads
    return rows


def evaluate(
    model: str, adapter: str | None = None, tasks: Sequence[str] = BENCHMARKS, **settings: Any
) -> list[dict[str, Any]]:
    """Evaluate one model (`adapter` None: the base); see `compare` and `EvalSettings`."""
    return compare(model, {_label(model, adapter) if adapter else "base": adapter}, tasks, **settings)


def column_name(row: Mapping[str, Any]) -> str:
    """A table column: benchmark, metric, n, and how it was run (chat template, generation cap)."""
    how = ["chat template" if row.get("apply_chat_template") else "no chat template"]
    if row.get("capped"):
        how.append(f"capped at {row['max_gen_toks']} tokens")
    return f"{row['benchmark']} ({row['metric']}, n={row['n']}, {', '.join(how)})"


def headline_table(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per model label, one column per benchmark: `value ± stderr` of the headline metric."""
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r["headline"]:
            continue
        cell = f"{r['value']:.3f}" + (f" ± {r['stderr']:.3f}" if r.get("stderr") is not None else "")
        table.setdefault(r.get("label", r["adapter"] or r["model"]), {})[column_name(r)] = cell
    return [{"model": label, **cells} for label, cells in table.items()]


# --------------------------------------------------------------------------------------------------
# Command line: one option per EvalSettings field, its help from the field's metadata
# --------------------------------------------------------------------------------------------------


def _number(text: str) -> int | float:
    """`20` is 20 documents, `0.25` a quarter of them; `1.0` stays a float (and is refused: lm-eval, one document)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _checked(name: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: convert, then `check_setting`, so a bad value is a usage error naming its option."""

    def parse(text: str) -> Any:
        value = convert(text)
        if name in RULES:
            try:
                check_setting(name, value)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = name  # argparse: "invalid limit value: 'abc'"
    return parse


def _chat_setting(text: str) -> bool | str:
    return {"true": True, "false": False}.get(text.lower(), text)


def _pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(";") if item)


CLI_TYPES: dict[str, Callable[[str], Any]] = {
    "tasks": lambda text: [t.strip() for t in text.split(",") if t.strip()],
    "limit": _number,
    "num_fewshot": int,
    "generation_slots": int,
    "batch_size": lambda text: int(text) if text.isdigit() else text,
    "max_gen_toks": int,
    "apply_chat_template": _chat_setting,
    "headline": _pairs,
    "seed": int,
    "gpu_memory_utilization": float,
    "tensor_parallel_size": int,
    "data_parallel_size": int,
}


def parse_adapters(values: Sequence[str] | None, base: bool, model: str) -> dict[str, str | None]:
    """`--adapter [LABEL=]PATH` (repeatable) and `--base`; with no adapter, the base model alone."""
    adapters: dict[str, str | None] = {"base": None} if base or not values else {}
    for value in values or []:
        label, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        adapters[label or _label(model, path)] = path
    return adapters


def main(argv: Sequence[str] | None = None) -> None:
    from mainlib.results import markdown_table

    parser = argparse.ArgumentParser(prog="python -m mainlib.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="bundled key, local folder or hub id")
    parser.add_argument("--adapter", action="append", help="[LABEL=]PATH of a mainlib adapter; repeatable")
    parser.add_argument("--base", action="store_true", help="also evaluate the base model (default with no --adapter)")
    for f in fields(EvalSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_const", const=True, help=f.metadata["help"])
        else:
            convert = _checked(f.name, CLI_TYPES.get(f.name, str))
            parser.add_argument(flag, type=convert, default=None, help=f.metadata["help"])
    args = vars(parser.parse_args(argv))
    model = args.pop("model")
    adapters = parse_adapters(args.pop("adapter"), args.pop("base"), model)
    rows = compare(model, adapters, **{k: v for k, v in args.items() if v is not None})
    if not rows:  # a data-parallel process other than rank 0
        return
    columns = ("label", "task", "metric", "filter", "value", "stderr", "n", "apply_chat_template", "max_gen_toks")
    print(markdown_table([{k: r[k] for k in columns} for r in rows if r["headline"]]))


if __name__ == "__main__":
    main()
