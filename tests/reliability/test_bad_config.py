"""Bad configurations through `run_main` and `run_musc`: one clear error before any model loads.

Each case sets flat parameters (as a notebook or `papermill -p` would) on the tiny setup and asserts the
error type and that the message names the parameter and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from mainlib.config import MainConfig, MuscConfig, build
from mainlib.musc.pipeline import run_musc
from mainlib.parameters import ConfigError, flat_parameters, set_path
from mainlib.pipeline import run_main


def with_flat(config: Any, **flat: Any) -> Any:
    """A copy of `config` with flat parameters set without any checking (validation is what is tested)."""
    config = copy.deepcopy(config)
    paths = flat_parameters(type(config))
    for name, value in flat.items():
        set_path(config, paths[name], value)
    return config


def files(tmp_path: Path) -> dict[str, str]:
    """Bad files and folders the cases point at."""
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "latin1.jsonl").write_bytes(b'{"instruction": "caf\xe9", "response": "ok"}\n')
    (tmp_path / "not_a_folder").write_text("a file")
    return {
        "empty_model": str(tmp_path / "empty_model"),
        "latin1": str(tmp_path / "latin1.jsonl"),
        "missing": str(tmp_path / "missing.jsonl"),
        "under_a_file": str(tmp_path / "not_a_folder" / "cache"),
    }


def rejection(run: Any, config: Any, flat: dict[str, Any], tmp_path: Path) -> str:
    """The ConfigError message of `run` on `config` with `flat` set ({name} placeholders: the bad `files`)."""
    paths = files(tmp_path)
    flat = {k: v.format(**paths) if isinstance(v, str) else v for k, v in flat.items()}
    with pytest.raises(ConfigError) as error:
        run(with_flat(config, **flat))
    return str(error.value)


MAIN_CASES = [  # flat overrides ({name} is filled from `files`), then substrings the message must hold
    ({"top_fraction": "abc"}, ["top_fraction (main.top_fraction): got 'abc'", "float"]),
    ({"learning_rate": "1e-3"}, ["learning_rate (sft.learning_rate): got '1e-3'", "float"]),
    ({"batch_size": 0}, ["batch_size (sft.batch_size): got 0", "[1, inf)"]),
    ({"epochs": 0.0}, ["epochs (sft.epochs): got 0.0", "(0, inf)"]),
    ({"n_seed": 0}, ["n_seed: got 0", "[1, inf)"]),
    ({"n_seed": -3}, ["n_seed: got -3", "[1, inf)"]),
    ({"final_alpha": 2.0}, ["final_alpha (main.final_alpha): got 2.0", "[0, 1]"]),
    ({"top_fraction": 0.5, "threshold": 0.1}, ["threshold", "top_fraction"]),
    ({"model": "nobody/no-such-model"}, ["model: got 'nobody/no-such-model'", "HF_HUB_OFFLINE=1", "smollm2"]),
    ({"model": "{empty_model}"}, ["empty_model", "has no config.json"]),
    ({"seed_data": "{missing}"}, ["seed_data", "missing.jsonl"]),
    ({"seed_data": "{latin1}"}, ["seed_data", "latin1.jsonl:1", "not UTF-8", "byte 0xe9"]),
]


@pytest.mark.parametrize(("flat", "expected"), MAIN_CASES, ids=lambda v: str(v)[:40])
def test_run_main_rejects_before_any_model(
    main_config: MainConfig, tmp_path: Path, load_calls: list[str], flat: dict, expected: list[str]
) -> None:
    message = rejection(run_main, main_config, flat, tmp_path)
    for text in expected:
        assert text in message
    assert load_calls == [] and not (Path(main_config.runs_dir) / main_config.run_name).exists()


def test_a_read_only_cache_is_named_before_the_bundled_model_is_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAINLIB_CACHE", files(tmp_path)["under_a_file"])  # cannot be created: a file is in the way
    with pytest.raises(ConfigError, match=r"parameter model: got 'smollm2-135m-instruct'; allowed: MAINLIB_CACHE = "):
        run_main(build(MainConfig, "quickstart", runs_dir=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()


MUSC_CASES = [
    ({"weight_mode": "entropy"}, ["weight_mode", "'entropy'", "'kl'"]),
    ({"beta": -0.1}, ["beta (dpo.beta): got -0.1", "(0, inf)"]),
    ({"drop_ratio": 0.0}, ["drop_ratio", "(0, 1]"]),
    ({"batch_size": 0}, ["batch_size", "[1, inf)"]),
    ({"instructions": "{missing}"}, ["instructions", "missing.jsonl"]),
    ({"adapter": "{empty_model}"}, ["adapter", "adapter_config.json"]),
    ({"model": "{empty_model}"}, ["model", "has no config.json"]),
]


@pytest.mark.parametrize(("flat", "expected"), MUSC_CASES, ids=lambda v: str(v)[:40])
def test_run_musc_rejects_before_any_model(
    tiny_model_dir: Path, tmp_path: Path, load_calls: list[str], flat: dict, expected: list[str]
) -> None:
    config = build(MuscConfig, "quickstart", model=str(tiny_model_dir), runs_dir=str(tmp_path / "runs"))
    message = rejection(run_musc, config, flat, tmp_path)
    for text in expected:
        assert text in message
    assert load_calls == [] and not (tmp_path / "runs").exists()
