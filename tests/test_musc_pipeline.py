"""The MuSC stages with the tiny model: resume, partial reruns, sharded resume, one base, zero weights, parameters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mainlib import models, shards
from mainlib.adapters import ModelBank
from mainlib.config import ConfigError, MuscConfig, build
from mainlib.models import LoraSettings
from mainlib.musc import tokens
from mainlib.musc.pipeline import STAGES, musc_stages, run_musc
from mainlib.shards import iter_rows
from mainlib.stages import plan


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
    rows = list(iter_rows(tmp_path / "runs" / "t" / "musc" / "token_weights"))
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


def test_stages_declare_what_they_read() -> None:
    config = build(MuscConfig, "quickstart", decompose="given")
    assert [s.name for s in musc_stages(config)] == list(STAGES)
    before = plan(musc_stages(config), config)
    config.quantization = "4bit"  # every stage that runs the model reruns; "given" decomposes without one
    after = plan(musc_stages(config), config)
    assert [name for name in STAGES if before[name] != after[name]] == ["contrast", "respond", "token_weights", "tdpo"]
    config.coarse.decompose = "model"
    assert "quantization" in musc_stages(config)[1].reads


class Killed(Exception):
    """Stands for a killed process."""


@pytest.mark.parametrize("stage", ["respond", "token_weights"])
def test_a_killed_sharded_stage_resumes_to_the_same_bytes(
    stage: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after its first shard (shard_size 2), the stage keeps that shard and computes the rest; every shard
    then holds the bytes an uninterrupted run wrote (sampling is seeded per shard, not per process)."""

    def config(run_name: str) -> MuscConfig:
        return tiny_config(tiny_model_dir, tmp_path, run_name=run_name, shard_size=2)

    whole = run_musc(config("whole"), until=stage)
    assert whole.counts[stage]["shards"]["total"] >= 2
    real, calls, kill = shards.run_sharded, [], [True]

    def killed_at_shard_1(out_dir, items, shard_size, work, **options):
        def work_until_killed(chunk, index):
            calls.append((options["desc"], index))
            if kill[0] and options["desc"] == stage and index == 1:
                raise Killed
            return work(chunk, index)

        return real(out_dir, items, shard_size, work_until_killed, **options)

    monkeypatch.setattr(shards, "run_sharded", killed_at_shard_1)
    with pytest.raises(Killed):
        run_musc(config("killed"), until=stage)
    folder = tmp_path / "runs" / "killed" / "musc" / stage
    assert not (folder / "manifest.json").exists() and (folder / "shards" / "00000.json").is_file()
    calls.clear()
    kill[0] = False
    resumed = run_musc(config("killed"), until=stage)
    assert resumed.ran == [stage] and (stage, 0) not in calls and (stage, 1) in calls  # shard 0 was kept
    assert resumed.counts[stage]["shards"]["resumed"] == 1
    runs = ("whole", "killed")
    for name in ("decompose", "contrast", "respond", "token_weights"):
        files = [sorted((tmp_path / "runs" / run / "musc" / name / "shards").glob("*.jsonl")) for run in runs]
        assert [p.name for p in files[0]] == [p.name for p in files[1]]
        for path, again in zip(*files, strict=True):
            assert again.read_bytes() == path.read_bytes(), (name, path.name)
    assert resumed.preferences == whole.preferences


@pytest.mark.parametrize("from_adapter", [False, True])
def test_one_base_for_the_whole_run(
    from_adapter: bool, tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path, load_calls: list[str]
) -> None:
    adapter = None
    if from_adapter:  # a starting adapter, as MAIN leaves one: loaded frozen, then trainable, in the same bank
        adapter = str(tmp_path / "start")
        bank = ModelBank(str(tiny_model_dir), "none")
        bank.add("forward", LoraSettings(r=4, alpha=8), seed=1)
        bank.save("forward", adapter, tiny_tokenizer, {"lora": {"r": 4}})
        load_calls.clear()
    # merge_adapter False: on CPU generation otherwise writes from a temporary merged copy, a second load
    unmerged = {"helper_merge_adapter": False, "response_merge_adapter": False}
    config = tiny_config(tiny_model_dir, tmp_path, adapter=adapter, **unmerged)
    state = run_musc(config)
    assert state.ran == list(STAGES) and load_calls == [str(tiny_model_dir)]  # generation, weights, DPO: one base
    saved = json.loads((state.adapter_dir / models.ADAPTER_CONFIG_FILE).read_text())
    assert list(saved) == ["base_model", "quantization", "start_adapter", "lora", "dpo", "weights"]
    assert saved["start_adapter"] == adapter and saved["base_model"] == str(tiny_model_dir)
    load_calls.clear()
    assert run_musc(config).ran == [] and load_calls == []  # nothing to do: no model at all


def test_all_zero_weights_are_handled_as_configured(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tokens.token_weights

    def first_response_unweighted(*args, **kwargs):  # as when x and x′ make the same predictions
        weights = real(*args, **kwargs)
        return [dataclasses.replace(weights[0], weights=(0.0,) * len(weights[0].weights)), *weights[1:]]

    monkeypatch.setattr(tokens, "token_weights", first_response_unweighted)
    uniform = run_musc(tiny_config(tiny_model_dir, tmp_path), until="token_weights")
    counts, pairs = uniform.counts["token_weights"], uniform.counts["respond"]["kept"]
    assert (counts["zero_weight_sequences"], counts["dropped_zero_weights"], counts["kept"]) == (1, 0, pairs)
    assert set(uniform.preferences[0]["chosen_weights"]["weights"]) == {1.0}  # plain DPO for that response
    dropped = run_musc(tiny_config(tiny_model_dir, tmp_path, zero_weights="drop"), until="token_weights")
    assert dropped.ran == ["token_weights"]
    counts = dropped.counts["token_weights"]
    assert (counts["zero_weight_sequences"], counts["dropped_zero_weights"], counts["kept"]) == (1, 1, pairs - 1)
    assert [r["id"] for r in dropped.preferences] == [r["id"] for r in uniform.preferences[1:]]


def test_a_starting_adapter_of_another_base_is_refused(tmp_path: Path) -> None:
    start = tmp_path / "start"
    start.mkdir()
    (start / "adapter_config.json").write_text("{}")
    (start / models.ADAPTER_CONFIG_FILE).write_text(json.dumps({"base_model": "some/other-model"}))
    config = build(MuscConfig, "quickstart", adapter=str(start), runs_dir=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match=r"parameter adapter: .*trained on 'some/other-model'"):
        run_musc(config)
    assert not (tmp_path / "runs").exists()


def test_heldout_pairs_are_left_out_of_training_and_measured(tiny_model_dir: Path, tmp_path: Path) -> None:
    trained_on_all = run_musc(tiny_config(tiny_model_dir, tmp_path))
    assert trained_on_all.heldout is None
    state = run_musc(tiny_config(tiny_model_dir, tmp_path, heldout_fraction=0.4))
    assert state.ran == ["tdpo"]  # the pairs are the same; only training and its measurement change
    pairs = state.counts["respond"]["kept"]
    held = round(0.4 * pairs)
    assert state.counts["tdpo"]["pairs"] == pairs - held and state.counts["tdpo"]["heldout_pairs"] == held
    for kind in ("weighted", "uniform"):
        result = state.heldout[kind]
        assert len(result["margins"]) == held
        assert result["accuracy"] == sum(m > 0 for m in result["margins"]) / held
