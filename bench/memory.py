"""`memory`: peak memory of our 7B-shape QLoRA SFT at batch 1 x 2048, with bf16 compute and as on a T4 (fp16)."""

from __future__ import annotations

from bench.measure import cuda, pretend_no_bf16
from bench.sft import SFTCase, run_case

T4_BUDGET_GIB = 15e9 / 1024**3  # a T4's 15 GB
TARGET_GIB = 12.0


def run(case: SFTCase) -> dict:
    record = {"bf16": run_case(case)}
    if cuda():
        with pretend_no_bf16():
            record["fp16_t4_path"] = run_case(case)
    for key in ("bf16", "fp16_t4_path"):
        if key in record:
            peak = record[key]["ours"]["peak_gib"]
            record[key]["within_12_gib"] = None if peak is None else peak <= TARGET_GIB
            record[key]["within_t4_budget"] = None if peak is None else peak <= T4_BUDGET_GIB
    return record
