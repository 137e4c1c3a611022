"""Shared fixtures. Everything runs on CPU and offline: the hub is switched off for the whole session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mainlib.config import MainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per test process, inherited by the notebook kernels and child processes the tests start. The
# tests' models are tiny (or 135M): with one thread per core, each of their small matmuls pays for thread
# synchronisation, and with a second process on the machine (the other xdist worker, a launched rank) the
# threads oversubscribe the cores: the tiny MuSC run took 44 s with 2 threads next to another busy process and
# 5 s with 1. `make test` runs the tests in one process per core instead (pytest-xdist, pyproject.toml).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from tests.tiny_model import build_tiny_model

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case a plugin imported torch before this file

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (a stable sort: the order within each kind is kept), so that under xdist the long
    ones start early and the many short ones fill the other workers in, instead of one long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def lm_eval_task_index_built_once():
    """lm-eval's `TaskManager` parses its ~15,000 task YAML files into an index on every construction (5-7 s on
    2 CPU cores), and every `evaluate`/`compare` call constructs one. The index depends on the folders alone, so
    this session builds it once per set of folders and hands each manager its own copy (the manager adds
    aliases to it). In this process only: notebook kernels and launched processes build their own."""
    import pickle

    from lm_eval.tasks._index import TaskIndex

    real, built = TaskIndex.build, {}

    def build_once(paths, **kwargs):
        paths = list(paths)
        key = (tuple(str(Path(p).resolve()) for p in paths), tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = pickle.dumps(real(paths, **kwargs))
        return pickle.loads(built[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TaskIndex, "build", staticmethod(build_once))
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + locally trained tokenizer with a chat template, saved once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from mainlib.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture()
def tiny_pool(tiny_tokenizer, tmp_path: Path) -> Path:
    """An unlabeled pool made of the responses of the 4 seed pairs the tiny-model runs sample (n_seed=4, seed 0).

    The tiny reverse model learns those 4 pairs by heart, so for these responses it writes an instruction
    and stops (EOS) instead of rambling to max_new_tokens, and synthesis keeps some pairs.
    """
    import json

    from mainlib import data

    seed_all, _ = data.clean_pairs(data.load_source("bundled:seed"), tiny_tokenizer, 160)
    seed, _ = data.sample_pairs(seed_all, 4, 0)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"response": p.response}) + "\n" for p in seed))
    return pool


@pytest.fixture()
def tiny_params(tiny_model_dir: Path, tiny_pool: Path, tmp_path: Path) -> dict:
    """Tiny-model parameters for notebooks 01-03 and the sweep over them (the pool: see `tiny_pool`)."""
    return dict(
        run_name="tiny",
        model=str(tiny_model_dir),
        pool_data=str(tiny_pool),
        n_seed=4,
        n_pool=None,
        max_length=160,
        lora_dropout=0.0,
        learning_rate=0.02,
        epochs=8.0,
        batch_size=4,
        round_batch_size=4,
        final_batch_size=4,
        round_learning_rate=1e-4,
        round_max_new_tokens=160,
        synthesis_max_new_tokens=160,
        synthesis_temperature=0.0,  # greedy: the tiny reverse model writes the instructions it learned, and stops
        runs_dir=str(tmp_path / "runs"),
        results_dir=str(tmp_path / "results"),
    )


@pytest.fixture()
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every `models.load_model` call, counted (a `ModelBank` loads its base through it)."""
    from mainlib import models

    calls, real = [], models.load_model

    def counting(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    return calls


@pytest.fixture()
def main_config(tiny_model_dir: Path, tiny_pool: Path, tmp_path: Path) -> MainConfig:
    """Four seed pairs, learned by heart (see `tiny_pool`), and a round that barely moves the models."""
    from mainlib.config import MainConfig
    from mainlib.generate import GenerationSettings
    from mainlib.models import LoraSettings
    from mainlib.mutual import MainSettings
    from mainlib.sft import SFTHyperparameters

    return MainConfig(
        run_name="tiny",
        runs_dir=str(tmp_path / "runs"),
        model=str(tiny_model_dir),
        pool_data=str(tiny_pool),
        n_seed=4,
        n_pool=None,
        max_length=160,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        sft=SFTHyperparameters(learning_rate=2e-2, epochs=8, batch_size=4, warmup=0, scheduler="constant"),
        round_sft=SFTHyperparameters(learning_rate=1e-4, epochs=1, batch_size=4),
        final_sft=SFTHyperparameters(learning_rate=1e-3, epochs=1),  # the demo's, not the spec's 1e-5 x 32
        main=MainSettings(rounds=1, top_fraction=0.5),
        round_generation=GenerationSettings(max_new_tokens=160),
        synthesis=GenerationSettings(max_new_tokens=160, temperature=0.0),  # greedy: the seed-learned instructions
    )
