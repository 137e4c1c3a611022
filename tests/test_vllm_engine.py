"""The vLLM engine's contract, against a stand-in `vllm` module (a real vLLM pins its own transformers and cannot be
installed beside this project's): one engine per stage, made after the HF models left, freed after the stage;
adapters served from their saved folders as LoRA requests; the GPU share and engine size as set; one seed per
request, derived from (seed, row), so duplicate prompts get different samples and a rerun the same ones."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import sys
import types
from pathlib import Path

import pytest

import mainlib.generate as gen
from mainlib import adapters, shards
from mainlib.config import MainConfig
from mainlib.generate import GenerationSettings, VllmSettings, request_seed
from mainlib.models import LoraSettings, load_model
from mainlib.pipeline import run_main


@dataclasses.dataclass
class Engines:
    """What the stand-in saw: each engine made, each generate call, and the order of releases and engines."""

    made: list[dict] = dataclasses.field(default_factory=list)
    calls: list[tuple] = dataclasses.field(default_factory=list)
    events: list[str] = dataclasses.field(default_factory=list)


@pytest.fixture()
def fake_vllm(monkeypatch: pytest.MonkeyPatch, tiny_tokenizer) -> Engines:
    seen, eos = Engines(), tiny_tokenizer.eos_token_id

    class LLM:
        def __init__(self, model: str, **kwargs) -> None:
            seen.made.append({"model": model, **kwargs})
            seen.events.append("engine")
            self.llm_engine = types.SimpleNamespace(shutdown=lambda: seen.events.append("shutdown"))

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            seen.calls.append((prompts, params, lora_request))
            # each request's "sample" is its seed: what it writes shows which seed it got
            return [
                types.SimpleNamespace(
                    outputs=[types.SimpleNamespace(token_ids=[3 + p["seed"] % 97, eos], finish_reason="stop")]
                )
                for p in params
            ]

    class LoRARequest:
        def __init__(self, name: str, lora_id: int, path: str) -> None:
            self.name, self.lora_id, self.path = name, lora_id, path

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kwargs: kwargs
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    real_release = adapters.ModelBank.release

    def release(bank: adapters.ModelBank) -> None:
        seen.events.append("release")
        real_release(bank)

    monkeypatch.setattr(adapters.ModelBank, "release", release)
    return seen


def test_synthesis_runs_one_engine_per_stage_with_lora_requests_and_per_request_seeds(
    fake_vllm: Engines, main_config: MainConfig, tmp_path: Path
) -> None:
    synthesis = dataclasses.replace(main_config.synthesis, engine="vllm", temperature=0.7, seed=5)
    vllm = VllmSettings(gpu_memory_utilization=0.4, tensor_parallel_size=1, max_lora_rank=8)
    config = dataclasses.replace(main_config, shard_size=2, synthesis=synthesis, vllm=vllm)
    state = run_main(config, until="synthesize")

    assert fake_vllm.events == ["release", "engine", "shutdown"]  # HF models out, one engine, freed at the end
    (made,) = fake_vllm.made
    assert made["model"] == str(Path(main_config.model)) and made["enable_lora"] is True
    assert "quantization" not in made  # the bank's base is not 4-bit here (CPU): nor is vLLM's
    assert made["gpu_memory_utilization"] == 0.4 and made["tensor_parallel_size"] == 1 and made["max_lora_rank"] == 8
    run = Path(config.runs_dir) / config.run_name
    assert len(fake_vllm.calls) == 2  # 4 responses, shards of 2
    for index, (prompts, params, lora_request) in enumerate(fake_vllm.calls):
        assert Path(lora_request.path) == (run / "round_0" / "reverse").resolve() and lora_request.lora_id == 1
        shard_seed = shards.shard_seed(5, index)
        assert [p["seed"] for p in params] == [request_seed(shard_seed, row) for row in range(len(prompts))]
        assert all(p["temperature"] == 0.7 and p["max_tokens"] == synthesis.max_new_tokens for p in params)
    assert len(state.synthesis.rows) == 4 and state.ran[-1] == "synthesize"


def test_duplicate_prompts_get_different_samples_and_reruns_the_same(fake_vllm: Engines, tiny_tokenizer) -> None:
    engine = gen.VllmEngine("base", VllmSettings())
    settings, eos = GenerationSettings(max_new_tokens=4, seed=7), [tiny_tokenizer.eos_token_id]
    first = engine.generate_ids([[1, 2, 3]] * 3, settings, eos, adapter_dir=None)
    assert len({tuple(g.token_ids) for g in first}) == 3  # the same prompt three times: three samples
    assert engine.generate_ids([[1, 2, 3]] * 3, settings, eos, adapter_dir=None) == first
    assert [p["seed"] for p in fake_vllm.calls[0][1]] == [request_seed(7, row) for row in range(3)]
    assert fake_vllm.calls[0][2] is None  # no adapter: the base model
    assert len({request_seed(7, row) for row in range(100)} | {request_seed(8, 0)}) == 101


def test_live_models_generate_with_hf(
    fake_vllm: Engines, monkeypatch: pytest.MonkeyPatch, tiny_model_dir, tiny_tokenizer
):
    """A model being trained (MAIN's rounds) is not served by vLLM: `auto` runs it with hf, `vllm` says why not."""
    model = load_model(str(tiny_model_dir), "none")
    monkeypatch.setattr(gen.torch.cuda, "is_available", lambda: True)  # auto would pick vLLM
    prompt = [tiny_tokenizer("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]]
    eos, pad = [tiny_tokenizer.eos_token_id], tiny_tokenizer.pad_token_id
    out = gen.generate_ids(model, prompt, GenerationSettings(max_new_tokens=4, temperature=0.0), eos, pad)
    assert len(out) == 1 and not fake_vllm.made
    with pytest.raises(ValueError, match="engine='vllm' serves saved adapters"):
        gen.generate_ids(model, prompt, GenerationSettings(max_new_tokens=4, engine="vllm"), eos, pad)


def test_an_unsaved_adapter_cannot_be_served(fake_vllm: Engines, tiny_model_dir) -> None:
    bank = adapters.ModelBank(str(tiny_model_dir), "none")
    bank.add("fresh", LoraSettings(r=4, alpha=8), seed=0)
    with (
        pytest.raises(ValueError, match="adapter 'fresh' has none"),
        bank.generator("fresh", GenerationSettings(engine="vllm")),
    ):
        pass
    assert not fake_vllm.made


def test_each_process_of_a_launch_runs_its_own_engine(fake_vllm: Engines, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `accelerate launch` (torchrun): vLLM's external launcher, one data-parallel rank per process."""
    gen.VllmEngine("base", VllmSettings())
    assert "distributed_executor_backend" not in fake_vllm.made[0]
    monkeypatch.setenv("WORLD_SIZE", "2")
    gen.VllmEngine("base", VllmSettings())
    assert fake_vllm.made[1]["distributed_executor_backend"] == "external_launcher"
    assert fake_vllm.made[1]["data_parallel_size"] == 2 and fake_vllm.made[1]["tensor_parallel_size"] == 1
