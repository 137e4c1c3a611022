"""The MuSC stages with the tiny model: resume, partial reruns, self-generated instructions, parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from mainlib.config import ConfigError, MuscConfig, build
from mainlib.data import load_jsonl
from mainlib.musc.pipeline import run_musc


def tiny_config(tiny_model_dir: Path, tmp_path: Path, **overrides) -> MuscConfig:
    params = dict(
        run_name="t",
        runs_dir=str(tmp_path / "runs"),
        model=str(tiny_model_dir),
        quantization="none",
        n=5,
        decompose="given",
        recombine="template",
        response_max_new_tokens=16,
        drop_unfinished=False,
        epochs=1.0,
        batch_size=4,
        learning_rate=1e-3,
        max_length=256,
    )
    return build(MuscConfig, "quickstart", **{**params, **overrides})  # the demo's LoRA and DPO settings


@pytest.mark.slow
def test_stages_resume_and_rerun_from_the_changed_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    state = run_musc(tiny_config(tiny_model_dir, tmp_path))
    assert state.ran == ["instructions", "decompose", "contrast", "respond", "token_weights", "tdpo"]
    rows = load_jsonl(tmp_path / "runs" / "t" / "musc" / "token_weights" / "preferences.jsonl")
    assert len(rows) == state.counts["respond"]["kept"] > 0
    for row in rows:
        assert {"prompt", "chosen", "rejected", "noised_prompt", "constraints", "corruption"} <= set(row)
        assert len(row["chosen_weights"]["weights"]) == len(row["chosen_weights"]["token_ids"])
    assert (state.adapter_dir / "mainlib_adapter.json").is_file()

    assert run_musc(tiny_config(tiny_model_dir, tmp_path)).ran == []
    changed = run_musc(tiny_config(tiny_model_dir, tmp_path, drop_ratio=0.6))
    assert changed.ran == ["contrast", "respond", "token_weights", "tdpo"]
    assert (tmp_path / "runs" / "t" / "musc" / "_superseded").is_dir()
    plain = run_musc(tiny_config(tiny_model_dir, tmp_path, drop_ratio=0.6, weight_mode="none"))
    assert plain.ran == ["token_weights", "tdpo"]
    assert {w for r in plain.preferences for w in r["chosen_weights"]["weights"]} == {1.0}


def test_self_generated_instructions(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_model_dir, tmp_path, instructions="self", n=3, decompose="model")
    config.coarse.self_instruct.max_new_tokens = 8
    state = run_musc(config, until="instructions")
    counts = state.counts["instructions"]
    dropped = sum(v for k, v in counts.items() if k not in ("sampled", "kept"))
    assert counts["sampled"] == 3 and counts["kept"] + dropped == 3


def test_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"parameter betaa: got 0\.1; allowed: no such parameter; did you mean beta"):
        build(MuscConfig, "quickstart", betaa=0.1)
    config = build(MuscConfig, "quickstart", beta=0.2, drop_ratio=0.5, weight_mode="pmi", seed=3)
    assert (config.dpo.beta, config.coarse.corruption.drop_ratio, config.weights.mode) == (0.2, 0.5, "pmi")
    assert config.coarse.respond.seed == config.dpo.seed == 3
    with pytest.raises(ValueError, match="until must be one of"):
        run_musc(config, until="train")
