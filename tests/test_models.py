"""Model loading policy, adapter round trips, and the bundled offline model."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mainlib import models
from mainlib.models import LoraSettings


def test_quantization_policy() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models.quantization_config("auto", cpu) is None
    assert models.quantization_config("none", cuda) is None
    forced = models.quantization_config("4bit", cpu)
    assert forced.load_in_4bit and forced.bnb_4bit_quant_type == "nf4" and forced.bnb_4bit_use_double_quant
    assert forced.bnb_4bit_compute_dtype == torch.float32
    with pytest.raises(ValueError, match="quantization must be"):
        models.quantization_config("8bit", cpu)  # type: ignore[arg-type]


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_base_under_fp32_lora_where_the_cpu_has_bf16(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, has_bf16: bool
) -> None:
    """`auto` on CPU: bf16 base weights exactly when the CPU has bf16 matrix instructions; `none` stays fp32 and
    `bf16` asks for bf16 anywhere. The LoRA weights (what training updates) are fp32 in every case."""
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: has_bf16)
    cpu = torch.device("cpu")
    assert models.weights_dtype("auto", cpu) == (torch.bfloat16 if has_bf16 else torch.float32)
    assert models.weights_dtype("none", cpu) == torch.float32
    assert models.weights_dtype("bf16", cpu) == torch.bfloat16
    assert models.quantization_config("bf16", cpu) is None
    model = models.add_lora(models.load_model(str(tiny_model_dir)), LoraSettings(r=4))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16 if has_bf16 else torch.float32} and trained == {torch.float32}


def test_resolve_leaves_hub_ids_and_paths_alone(tmp_path: Path) -> None:
    assert models.resolve_model("meta-llama/Llama-3.2-1B-Instruct") == "meta-llama/Llama-3.2-1B-Instruct"
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)


def test_hub_id_offline_fails_loudly() -> None:
    """A hub id is passed to transformers as is; offline (as in tests) that is an error, never a silent fallback."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(OSError):
        models.load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_4bit_lora_on_cpu_and_adapter_round_trip(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.load_model(str(tiny_model_dir), quantization="4bit")
    assert models.is_quantized(model)
    peft_model = models.add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapter non-trivial so the round trip is meaningful
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    x = torch.tensor([tiny_tokenizer("Write a poem about the sea.")["input_ids"]])
    with torch.no_grad():
        before = peft_model(input_ids=x).logits
    out = models.save_adapter(peft_model, tiny_tokenizer, tmp_path / "adapter", {"base_model": str(tiny_model_dir)})
    reloaded, tokenizer, config = models.load_adapter(out, quantization="4bit")
    with torch.no_grad():
        after = reloaded(input_ids=x).logits
    assert config["base_model"] == str(tiny_model_dir) and tokenizer.chat_template == tiny_tokenizer.chat_template
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), reloaded.disable_adapter():
        assert not torch.allclose(reloaded(input_ids=x).logits, before, atol=1e-3)


def test_4bit_cpu_outputs_survive_a_state_dict(tiny_model_dir: Path, tiny_tokenizer) -> None:
    """bitsandbytes packs CPU 4-bit weights in eval mode and unpacks them for `state_dict()` (peft takes one to load
    an adapter), lossily; `load_model` keeps them unpacked, so outputs do not move."""
    model = models.load_model(str(tiny_model_dir), quantization="4bit").eval()
    x = torch.tensor([tiny_tokenizer("Write a poem about the sea.")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=x).logits
        model.state_dict()
        assert torch.equal(model(input_ids=x).logits, before)


def test_load_adapter_needs_the_mainlib_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"mainlib_adapter\.json"):
        models.load_adapter(tmp_path)


def test_killed_conversion_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A conversion that dies midway leaves neither a model in the cache nor a temporary folder.

    What is read from the GGUF does not matter here (test_bundled_model_converts_once_and_answers converts the
    real one): the tiny model stands in for it, which saves dequantising 135M parameters just to die."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("MAINLIB_CACHE", str(tmp_path))
    read_from_gguf = []

    def tiny_instead(auto):
        def from_pretrained(folder, gguf_file, **kwargs):
            read_from_gguf.append((auto.__name__, gguf_file))
            return auto.from_pretrained(tiny_model_dir, **kwargs)

        return SimpleNamespace(from_pretrained=from_pretrained, from_config=getattr(auto, "from_config", None))

    monkeypatch.setattr(models, "AutoTokenizer", tiny_instead(AutoTokenizer))
    monkeypatch.setattr(models, "AutoModelForCausalLM", tiny_instead(AutoModelForCausalLM))

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", die)
    with pytest.raises(KeyboardInterrupt):
        models.convert_bundled_model("smollm2-135m-instruct")
    assert [auto for auto, _ in read_from_gguf] == ["AutoTokenizer", "AutoModelForCausalLM"]  # it got to saving
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.slow
def test_bundled_model_converts_once_and_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mainlib.data import Pair
    from mainlib.generate import GenerationSettings, complete_pairs

    monkeypatch.setenv("MAINLIB_CACHE", str(tmp_path))
    converted = models.convert_bundled_model("smollm2-135m-instruct")
    assert (converted / "model.safetensors").is_file() and (converted / "mainlib_provenance.json").is_file()
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    tokenizer = models.load_tokenizer("smollm2-135m-instruct")
    model = models.load_model("smollm2-135m-instruct")  # from the cache: no second conversion
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert not any(p.name.startswith(".") for p in (tmp_path / "models").iterdir())
    greedy = GenerationSettings(max_new_tokens=24, temperature=0.0)
    answer = complete_pairs(model, tokenizer, "forward", [Pair("What is the capital of France?", "")], greedy)[0]
    assert "Paris" in answer.text and answer.finish_reason == "eos"
