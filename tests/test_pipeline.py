"""The MAIN pipeline end to end on the tiny model: stages, resume, reruns after a change, bad input."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from mainlib.mutual import MainSettings
from mainlib.pipeline import PipelineConfig, run_main
from mainlib.stages import RunMismatchError


@pytest.fixture()
def config(main_config: PipelineConfig) -> PipelineConfig:
    return main_config


def test_end_to_end_then_resume_then_rerun(config: PipelineConfig) -> None:
    state = run_main(config)
    assert state.ran == ["inputs", "init_sft", "round_0", "synthesize", "score", "select", "final_sft"]
    run_dir = Path(config.runs_dir) / config.run_name
    assert all((run_dir / stage / "manifest.json").is_file() for stage in state.ran)
    synthesis = state.stages["synthesize"]["counts"]
    assert synthesis["pool"] == 4 and synthesis["kept"] + sum(synthesis["dropped"].values()) == 4
    assert len(state.selection["kept"]) == math.ceil(0.5 * synthesis["kept"])
    final = state.stages["final_sft"]["counts"]  # a pair whose prompt fills max_length has no target left
    assert final["examples"] + final.get("no_target", 0) == 4 + len(state.selection["kept"])
    assert len(state.scores.forward) == synthesis["kept"] and state.sft["round_0_forward"]["losses"]
    assert (run_dir / "final_sft" / "forward" / "adapter_model.safetensors").is_file()

    again = run_main(config)  # everything up to date
    assert again.ran == [] and again.selection == state.selection

    config.main.top_fraction = 1.0  # only the selection and what follows it rerun
    changed = run_main(config)
    assert changed.ran == ["select", "final_sft"]
    assert len(changed.selection["kept"]) == synthesis["kept"]
    assert (run_dir / "_superseded").is_dir()

    (run_dir / "score" / "manifest.json").unlink()  # as if killed while scoring
    resumed = run_main(config)
    # redone with the same config and inputs, so its fingerprint and everything after it still hold
    assert resumed.ran == ["score"]


def test_until_stops_early_and_humpback_rates(config: PipelineConfig) -> None:
    config.main.filter_method = "humpback"
    state = run_main(config, until="synthesize")
    assert state.ran == ["inputs", "init_sft", "round_0", "synthesize"] and state.scores is None
    state = run_main(config)
    assert state.ran == ["score", "rate", "select", "final_sft"]
    assert len(state.ratings) == state.stages["synthesize"]["counts"]["kept"]
    assert state.stages["rate"]["counts"]["unparseable_ratings"] == sum(r is None for r in state.ratings)
    assert state.selection["kept"] == [i for i, r in enumerate(state.ratings) if r is not None and r >= 4]


def test_bad_input_is_one_clear_error(config: PipelineConfig, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"pool_data: .*empty\.jsonl: no records \(the file is empty\)"):
        run_main(PipelineConfig(**{**config.__dict__, "pool_data": str(empty)}))
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"response": "  "}\n{"response": ""}\n')
    with pytest.raises(ValueError, match=r"no response survives cleaning .*'empty_response': 2"):
        run_main(PipelineConfig(**{**config.__dict__, "pool_data": str(blank)}))
    with pytest.raises(ValueError, match=r"parameter top_fraction \(main\.top_fraction\): got 0\.0; allowed: \(0, 1\]"):
        run_main(PipelineConfig(**{**config.__dict__, "main": MainSettings(top_fraction=0.0)}))
    with pytest.raises(
        ValueError, match=r"parameter filter_method \(main\.filter_method\): got 'magic'; allowed: 'mutual' \|"
    ):
        run_main(PipelineConfig(**{**config.__dict__, "main": MainSettings(filter_method="magic")}))
    with pytest.raises(ValueError, match="until must be one of"):
        run_main(config, until="everything")
    run_main(config, until="init_sft")
    with pytest.raises(RunMismatchError, match="Choose another run_name"):
        run_main(PipelineConfig(**{**config.__dict__, "seed_data": "bundled:heldout"}), until="init_sft")
    assert (Path(config.runs_dir) / config.run_name / "init_sft" / "manifest.json").is_file()


def test_humpback_synthesises_with_the_seed_only_reverse_adapter(config: PipelineConfig) -> None:
    """ALGORITHMS.md §3: Humpback backtranslates with the reverse model trained on the seed alone, not p_r^K."""
    from mainlib import data
    from mainlib.adapters import ModelBank
    from mainlib.generate import complete_pairs
    from mainlib.models import load_tokenizer

    config.main.filter_method = "humpback"
    state = run_main(config, until="synthesize")
    assert set(state.stages["synthesize"]["inputs"]) == {"inputs", "init_sft"}  # not round_0
    run_dir = Path(config.runs_dir) / config.run_name
    bank, tokenizer = ModelBank(config.model, config.quantization), load_tokenizer(config.model)
    bank.load("seed_reverse", run_dir / "init_sft" / "reverse")
    with bank.use("seed_reverse") as model:  # greedy (see the fixture): the same instructions, written again
        written = complete_pairs(model, tokenizer, "reverse", state.pool, config.synthesis)
    rows = data.load_jsonl(run_dir / "synthesize" / "rows.jsonl")
    assert [r["instruction"] for r in rows] == [data.normalize_text(g.text) for g in written]


def killed_synthesis(config_file: str, mode: str) -> None:
    """Run in a subprocess: MAIN up to `synthesize` (2 shards), SIGKILLed at shard 1: before it starts
    ("boundary": shard 0 complete) or while its rows file is half written ("mid")."""
    import os
    import pickle
    import signal

    from mainlib import shards

    config = pickle.loads(Path(config_file).read_bytes())
    real_compute, real_write = shards._compute, shards.write_jsonl

    def dying_write(path, rows):
        def first_row_then_die():
            for i, row in enumerate(rows):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield row

        return real_write(path, first_row_then_die())

    def compute(folder, index, *args):
        if folder.parent.name == "synthesize" and index == 1:
            if mode == "boundary":
                os.kill(os.getpid(), signal.SIGKILL)
            shards.write_jsonl = dying_write
        return real_compute(folder, index, *args)

    shards._compute = compute
    run_main(config, until="synthesize")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["boundary", "mid"])
def test_killed_synthesis_resumes_byte_identical(config: PipelineConfig, tmp_path: Path, mode: str) -> None:
    import pickle
    import shutil
    import signal
    import subprocess
    import sys

    config.shard_size = 2  # the 4 pool responses: 2 shards
    whole = Path(config.runs_dir) / config.run_name
    run_main(config, until="synthesize")
    killed = dataclasses.replace(config, run_name="killed")
    shutil.copytree(whole, Path(config.runs_dir) / "killed", ignore=shutil.ignore_patterns("synthesize"))
    config_file = tmp_path / "config.pkl"
    config_file.write_bytes(pickle.dumps(killed))
    code = f"from tests.test_pipeline import killed_synthesis; killed_synthesis({str(config_file)!r}, {mode!r})"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stage = Path(config.runs_dir) / "killed" / "synthesize"
    assert not (stage / "manifest.json").exists() and (stage / "attempt.json").is_file()
    resumed = run_main(killed, until="synthesize")
    assert resumed.ran == ["synthesize"]
    assert resumed.stages["synthesize"]["counts"] == run_main(config, until="synthesize").stages["synthesize"]["counts"]
    outputs = sorted(p.relative_to(whole / "synthesize") for p in (whole / "synthesize").rglob("*.jsonl"))
    assert len(outputs) == 4  # two shards, rows.jsonl, synthetic.jsonl
    for name in outputs:
        assert (stage / name).read_bytes() == (whole / "synthesize" / name).read_bytes(), name
    assert not [p for p in stage.rglob("*") if p.name.startswith(".")]  # no partial file left behind
