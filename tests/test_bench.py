"""The benchmark harness runs every suite end to end on tiny shapes, and its correctness checks hold.

The numbers themselves are CPU smoke numbers; the H100 figures come from the same code without --smoke.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.report import verdicts
from mainlib.models import use_checkpointing


@pytest.mark.slow
def test_every_suite_runs_and_its_checks_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAINLIB_CACHE", str(tmp_path / "cache"))  # the random-weight shapes are built here
    out = tmp_path / "bench" / "cpu.json"
    assert main(["all", "--profile", "smoke", "--trace", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    suites = payload["suites"]
    assert set(suites) == {"sft", "generate", "score", "tdpo", "memory"}
    sft = suites["sft"]["llama-3.2-1b"]
    assert sft["stock"]["tokens_per_s"] > 0 and sft["ours"]["tokens_per_s"] > 0
    # The same examples went through both (the timed steps may draw them in another order).
    assert sft["stock"]["tokens_all_steps"] == sft["ours"]["tokens_all_steps"]
    # stock: TRL's default (on); ours: mainlib's default for the device (on for CPU, off on GPUs)
    assert sft["stock"]["grad_checkpointing"] and sft["ours"]["grad_checkpointing"] == use_checkpointing(None)
    variants = sft["variants"]
    assert variants["checkpointed"]["grad_checkpointing"] and not variants["default"]["packed"]
    assert variants["flex_packed"] == {"skipped": "FlexAttention has no backward on CPU (torch 2.13)"}
    assert variants["liger"] == {"skipped": "Liger kernels are Triton kernels: CUDA only"}
    assert set(suites["generate"]["variants"]) == {"default", "hf", "static", "merged_hf"}
    assert suites["generate"]["stock"]["new_tokens"] > 0
    assert suites["score"]["speedup"] > 0 and suites["tdpo"]["step_time_ratio"] > 0
    # Every fast path was compared with its plain path on the same batch, and agreed.
    assert set(suites["score"]["variants"]) == {"default", "rows_4", "merged_bf16"}
    assert len(payload["checks"]) == 11 and all(payload["checks"].values()), payload["checks"]
    assert suites["tdpo"]["check"]["unit_weights_loss_vs_stock"]["reference"] != pytest.approx(0.6931, abs=1e-3)
    assert payload["commands"]["tdpo"] == f"python -m bench all --profile smoke --trace --out {out}"
    assert out.with_suffix(".png").stat().st_size > 10_000
    # --trace: one more call of each path under the profiler, its heaviest operators.
    for traced in (sft["stock"], sft["ours"], suites["generate"]["stock"], suites["score"]["ours"]):
        ops = traced["trace"]["top_ops"]
        assert ops and all(op["self_ms"] >= 0 for op in ops) and sum(op["share"] for op in ops) <= 1.0 + 1e-9
    assert any("addmm" in op["op"] or "mm" in op["op"] for op in sft["ours"]["trace"]["top_ops"])

    # Rerunning one suite, or one shape of one, keeps the others.
    assert main(["sft/llama-3.2-1b", "--profile", "smoke", "--out", str(out)]) == 0
    assert "sft/llama-3.2-1b" in json.loads(out.read_text())["commands"]
    assert main(["score", "tdpo", "--profile", "smoke", "--out", str(out)]) == 0
    rerun = json.loads(out.read_text())["suites"]
    assert set(rerun) == set(suites) and rerun["score"]["ours"]["trace"] is None  # no --trace this time


def test_verdicts_read_each_target_the_right_way_round() -> None:
    suites = {
        "sft": {"llama-3.2-1b": {"speedup": 2.5, "memory_ratio": 1.2}},
        "tdpo": {"step_time_ratio": 1.05, "memory_ratio": 1.1},
        "score": {"speedup": 4.9},
    }
    got = {row["target"]: row["met"] for row in verdicts(suites)}
    assert got["SFT 1B tokens/s vs stock"] is True
    assert got["SFT 1B peak memory vs stock"] is False
    assert got["token-weighted DPO step time vs stock"] is True
    assert got["token-weighted DPO peak memory vs stock"] is False
    assert got["scoring pairs/s vs naive loop"] is False
    assert got["generation tokens/s vs stock"] is None  # not measured


@pytest.mark.parametrize(
    ("device", "short"),
    [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-40GB", "a100"), ("Tesla T4", "t4"), ("NVIDIA H200", "h200")],
)
def test_results_file_is_named_for_the_gpu(device: str, short: str) -> None:
    from bench.gpu_name import short_name

    assert short_name(device) == short
