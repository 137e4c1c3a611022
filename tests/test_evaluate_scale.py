"""Evaluation at scale: lm-eval's data parallelism under accelerate launch, and its vllm backend (a stand-in)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import socket
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM

from mainlib import generate, results
from mainlib.evaluate import EvalSettings, compare, in_document_order, main, resolve_backend, vllm_lora_rank
from tests.test_evaluate import big_adapters  # noqa: F401  (a fixture: two LoRA adapters on the tiny model)

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


@pytest.fixture()
def adapter_a(request: pytest.FixtureRequest) -> str:
    """Adapter A of test_evaluate's module-scoped `big_adapters` (r=4, large random B matrices)."""
    return request.getfixturevalue("big_adapters")["A"]


# --------------------------------------------------------------------------------------------------
# hf, several processes: lm-eval shards the documents, rank 0 reports
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port for the process group's rendezvous (29500, the default, may be taken by another job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(launcher: list[str], args: list[str]) -> str:
    """`python -m mainlib.evaluate` under `launcher`, one thread per process; its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*launcher, "-m", "mainlib.evaluate", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def cached_requests(folder: Path) -> dict[str, set[str]]:
    """The request keys in each of lm-eval's per-rank request caches (`<name>_rank<r>.db`), by rank."""
    out = {}
    for db in sorted(folder.glob("*_rank*.db")):
        with sqlite3.connect(db) as connection:
            out[db.stem.rpartition("_")[2]] = {key for (key,) in connection.execute("SELECT key FROM unnamed")}
    return out


@pytest.mark.slow
@pytest.mark.heavy  # three processes importing the whole stack; the pieces are unit-tested below (make test-all)
def test_two_processes_give_the_one_process_rows(tiny_model_dir: Path, adapter_a: str, tmp_path: Path) -> None:
    """`accelerate launch` with 2 CPU processes: documents split between them, the rows of one process."""
    args = ["--model", str(tiny_model_dir), "--adapter", f"A={adapter_a}", "--tasks", "mmlu", "--limit", "3"]
    args += ["--batch-size", "4", "--data", "bundled", "--quantization", "none", "--results-dir", str(tmp_path)]
    runs = {"one": [sys.executable]}
    runs["two"] = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    runs["two"] += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    stdout = {
        n: run_cli(launch, [*args, "--run-name", n, "--cache-dir", str(tmp_path / n)]) for n, launch in runs.items()
    }

    records = {n: [json.loads(p.read_text()) for p in (tmp_path / n / "eval").glob("*.json")] for n in runs}
    assert len(records["one"]) == len(records["two"]) == 1
    one, two = records["one"][0], records["two"][0]
    assert (one["settings"]["processes"], two["settings"]["processes"]) == (1, 2)
    assert one["lm_eval"]["n-samples"] == two["lm_eval"]["n-samples"]

    def exact(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("seconds", "stderr")} for r in rows]

    assert exact(two["summary"]) == exact(one["summary"]) and len(one["summary"]) == 5  # the group + 4 subjects
    assert [r["stderr"] for r in two["summary"]] == pytest.approx([r["stderr"] for r in one["summary"]], rel=1e-12)
    # each process scored its own share of the documents, and together all of them
    alone, shared = cached_requests(tmp_path / "one"), cached_requests(tmp_path / "two")
    assert set(alone) == {"rank0"} and set(shared) == {"rank0", "rank1"}
    assert shared["rank0"] | shared["rank1"] == alone["rank0"] and not shared["rank0"] & shared["rank1"]
    # rank 0 alone returned rows (the table is printed once)
    assert [stdout[n].count("| A | mainlib_mmlu_bundled |") for n in runs] == [1, 1]


def test_gathered_samples_are_put_in_one_process_order() -> None:
    """Rank 0 holds documents 0 and 2, rank 1 document 1; two filters each."""
    gathered = [{"doc_id": d, "filter": f} for f in ("strict", "flexible") for d in (0, 2)]
    gathered += [{"doc_id": 1, "filter": f} for f in ("strict", "flexible")]
    ordered = [(s["filter"], s["doc_id"]) for s in in_document_order(gathered)]
    assert ordered == [("strict", 0), ("strict", 1), ("strict", 2), ("flexible", 0), ("flexible", 1), ("flexible", 2)]


def test_the_process_group_sets_rank_and_world_size() -> None:
    """What HFLM does only with several CUDA devices, done whenever the launcher made several processes."""
    from mainlib.lm import ContinuousHFLM

    accelerator = types.SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu", 0))
    lm = types.SimpleNamespace(accelerator=accelerator, _rank=0, _world_size=1, _device=torch.device("cpu"))
    ContinuousHFLM._join_process_group(lm)
    assert (lm._rank, lm._world_size, lm._device) == (1, 2, torch.device("cpu", 0))
    alone = types.SimpleNamespace(_rank=0, _world_size=1)  # one process: HFLM keeps no accelerator
    ContinuousHFLM._join_process_group(alone)
    assert (alone._rank, alone._world_size) == (0, 1)


# --------------------------------------------------------------------------------------------------
# vllm: the backend setting, and what lm-eval's VLLM model is given
# --------------------------------------------------------------------------------------------------


def use_stand_in_vllm(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """`vllm` importable, CUDA available, lm-eval's `vllm` model a recorder; returns its constructor arguments."""
    import lm_eval.api.registry as registry

    calls: list[dict] = []

    class RecordingVLLM(LM):
        """Records its arguments; scores a choice by its length and answers every question with "4"."""

        def __init__(self, **kwargs) -> None:
            super().__init__()
            calls.append(kwargs)

        def loglikelihood(self, requests):
            return [(-float(len(r.args[1])), False) for r in requests]

        def generate_until(self, requests):
            return ["The answer is 4."] * len(requests)

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    fake = types.ModuleType("vllm")
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(results, "device_description", lambda: "stand-in GPU")  # the JSON's provenance
    real = registry.get_model
    monkeypatch.setattr(registry, "get_model", lambda name: RecordingVLLM if name == "vllm" else real(name))
    return calls


@pytest.mark.slow
def test_vllm_gets_a_lora_per_label_and_the_parallel_settings(
    tiny_model_dir: Path, adapter_a: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapters = {"base": None, "A": adapter_a}
    common = dict(data="bundled", limit=2, max_gen_toks=8, apply_chat_template=False, results_dir=str(tmp_path))
    hf = compare(str(tiny_model_dir), adapters, ["mmlu"], quantization="none", run_name="hf", **common)
    calls = use_stand_in_vllm(monkeypatch)
    parallel = dict(gpu_memory_utilization=0.5, tensor_parallel_size=2, data_parallel_size=2)
    rows = compare(str(tiny_model_dir), adapters, ["mmlu"], run_name="vllm", **parallel, **common)

    engine = dict(pretrained=str(tiny_model_dir), dtype="auto", quantization=None, batch_size="auto", seed=0)
    engine |= parallel
    lora = dict(enable_lora=True, max_lora_rank=8, lora_local_path=adapter_a)  # the adapter's r=4 fits in 8
    assert calls == [engine, {**engine, **lora}]

    def shape(rows: list[dict]) -> list[tuple]:
        return [(sorted(r), r["label"], r["task"], r["metric"], r["filter"], r["n"], r["headline"]) for r in rows]

    assert shape(rows) == shape(hf)  # the same rows, in the same order, with the same keys
    record = json.loads((tmp_path / "vllm" / "eval" / f"{tiny_model_dir.name}__mmlu.json").read_text())
    assert record["settings"]["backend"] == "vllm"  # what "auto" chose, as recorded
    assert record["settings"]["tensor_parallel_size"] == 2 and record["summary"] == rows[: len(record["summary"])]


def test_backend_choice_and_its_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(generate, "vllm_available", lambda: False)
    assert resolve_backend(EvalSettings()) == "hf"
    with pytest.raises(ModuleNotFoundError, match="backend='vllm' needs the vllm package"):
        resolve_backend(EvalSettings(backend="vllm"))
    monkeypatch.setattr(generate, "vllm_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend(EvalSettings()) == "hf"  # vLLM needs CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend(EvalSettings()) == "vllm"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_backend(EvalSettings()) == "hf"  # several processes: hf's data parallelism
    with pytest.raises(ValueError, match="launch it without accelerate launch"):
        resolve_backend(EvalSettings(backend="vllm"))
    with pytest.raises(ValueError, match="tensor_parallel_size and data_parallel_size must be 1 with backend='hf'"):
        resolve_backend(EvalSettings(backend="hf", data_parallel_size=2))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(backend="vlm"), "backend must be one of 'auto', 'hf', 'vllm'"),
        (dict(gpu_memory_utilization=0), r"gpu_memory_utilization must be a number in \(0, 1\]"),
        (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be a number in \(0, 1\]"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be an int >= 1"),
        (dict(data_parallel_size=1.5), "data_parallel_size must be an int >= 1"),
    ],
)
def test_bad_scale_settings(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EvalSettings(**setting)


def test_cli_refuses_a_bad_memory_share(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--gpu-memory-utilization", "2"])
    assert "gpu_memory_utilization must be a number in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "rank"),
    [({"r": 4}, 8), ({"r": 16}, 16), ({"r": 20}, 32), ({"r": 8, "rank_pattern": {"q_proj": 64}}, 64)],
)
def test_vllm_lora_rank_holds_the_adapter(tmp_path: Path, config: dict, rank: int) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert vllm_lora_rank(str(tmp_path)) == rank


def test_vllm_lora_rank_above_vllms_largest(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(ValueError, match="LoRA rank 1024 is above vLLM's largest max_lora_rank, 512"):
        vllm_lora_rank(str(tmp_path))
