"""ModelBank: one base loaded and prepared once, named adapters that are used, trained and saved one at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mainlib import models
from mainlib.adapters import ModelBank
from mainlib.data import Pair
from mainlib.models import LoraSettings
from mainlib.musc.tdpo import DPOSettings, train_bank_tdpo
from mainlib.results import peak_memory
from mainlib.sft import SFTSettings, train_bank_adapter

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
PAIRS = [Pair("Name a fruit.", "An apple."), Pair("What is 2 + 2?", "2 + 2 is 4.")]
ROWS = [
    {"prompt": "Name a fruit. Answer in one word.", "chosen": "Apple.", "rejected": "Apples are red or green fruits."},
    {"prompt": "Say hello in French, in lower case.", "chosen": "bonjour", "rejected": "BONJOUR!"},
]


def perturb(bank: ModelBank, name: str, seed: int) -> None:
    """Give adapter `name` non-zero LoRA B weights (a fresh adapter equals the base), drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    marker = f".{bank.peft_name(name)}."
    with torch.no_grad():
        for key, param in sorted(bank.model.named_parameters()):
            if "lora_B" in key and marker in key:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(bank: ModelBank) -> dict[str, torch.Tensor]:
    return {key: param.detach().clone() for key, param in bank.model.named_parameters()}


@pytest.fixture()
def ids(tiny_tokenizer) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer("Write a poem about the sea.")["input_ids"]])


def test_one_base_holds_named_adapters(tiny_model_dir: Path, ids, load_calls) -> None:
    bank = ModelBank(str(tiny_model_dir), "none")
    assert load_calls == []  # lazy: nothing loads before the first adapter
    bank.add("forward", LORA, seed=0)  # "forward" is a torch attribute: peft knows it as "forward_adapter"
    bank.add("reverse", LORA, seed=1)
    assert load_calls == [str(tiny_model_dir)] and bank.names == ["forward", "reverse"]
    perturb(bank, "forward", 0)
    perturb(bank, "reverse", 1)
    with bank.use("forward") as model:
        forward = logits(model, ids)
    with bank.use("reverse") as model:
        reverse = logits(model, ids)
    with bank.use(None) as model:
        base = logits(model, ids)
    plain = models.load_model(str(tiny_model_dir), "none")
    torch.testing.assert_close(base, logits(plain, ids), rtol=0, atol=1e-6)
    assert not torch.allclose(forward, reverse, atol=1e-3) and not torch.allclose(forward, base, atol=1e-3)
    base_weights = sum(p.numel() for key, p in bank.model.named_parameters() if "lora_" not in key)
    assert base_weights == sum(p.numel() for p in plain.parameters())  # one copy of the base, not one per adapter


def test_seeded_init_is_reproducible_and_leaves_the_global_rng(tiny_model_dir: Path) -> None:
    bank = ModelBank(str(tiny_model_dir), "none")
    torch.manual_seed(123)
    bank.add("a", LORA, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # the global RNG did not move
    bank.add("b", LORA, seed=7)
    bank.add("c", LORA, seed=8)
    a, b, c = (bank.weights(n) for n in ("a", "b", "c"))  # "a" is a part of peft's "lora_": renamed inside
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_one_adapter_leaves_the_others_alone(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    bank = ModelBank(str(tiny_model_dir), "none")
    bank.add("forward", LORA, seed=0)
    bank.add("reverse", LORA, seed=1)
    perturb(bank, "reverse", 1)
    before = snapshot(bank)
    with bank.train("forward") as model:
        trainable = [key for key, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".forward_adapter." in key for key in trainable)
    settings = SFTSettings(epochs=2, batch_size=2, learning_rate=2e-2, warmup=0, scheduler="constant", max_length=64)
    result = train_bank_adapter(bank, "forward", tiny_tokenizer, PAIRS, settings, tmp_path / "forward", {"round": 0})
    assert result.counts["optimizer_steps"] == 2
    after = snapshot(bank)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(".forward_adapter." in key for key in changed)  # reverse and the base: bit-identical
    assert not any(p.requires_grad for p in bank.model.parameters())  # frozen again after training
    saved = json.loads((tmp_path / "forward" / models.ADAPTER_CONFIG_FILE).read_text())
    assert saved["base_model"] == str(tiny_model_dir) and saved["round"] == 0 and saved["sft"]["epochs"] == 2
    assert (tmp_path / "forward" / "sft_result.json").is_file()


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_dpo_trains_one_adapter_against_its_start(
    tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path, quantization
) -> None:
    """A trained adapter's reference is a frozen copy of its start in the same bank (first loss log 2, though the
    adapter differs from the base); the copy is gone afterwards and the other adapter and the base are unchanged."""
    bank = ModelBank(str(tiny_model_dir), quantization)
    bank.add("forward", LORA, seed=0)  # MuSC can start from MAIN's forward adapter in the same bank
    bank.add("reverse", LORA, seed=1)
    perturb(bank, "forward", 0)
    before = snapshot(bank)
    settings = DPOSettings(learning_rate=5e-3, epochs=3, batch_size=2, warmup=0.0, scheduler="constant")
    result = train_bank_tdpo(bank, "forward", tiny_tokenizer, ROWS, settings, tmp_path / "dpo")
    assert result.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert result.log[-1]["rewards/margins"] > 0.01
    assert bank.names == ["forward", "reverse"] and "ref" not in bank.model.peft_config
    after = snapshot(bank)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(".forward_adapter." in key for key in changed)
    assert not any(p.requires_grad for p in bank.model.parameters())


def test_dpo_from_a_fresh_adapter_uses_the_base(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path) -> None:
    bank = ModelBank(str(tiny_model_dir), "none")
    bank.add("policy", LORA, seed=0)
    bank.add("sft", LoraSettings(r=4, alpha=8, dropout=0.1), seed=1)
    settings = DPOSettings(learning_rate=5e-3, epochs=2, batch_size=2, warmup=0.0, scheduler="constant")
    result = train_bank_tdpo(bank, "policy", tiny_tokenizer, ROWS, settings, tmp_path / "dpo")
    assert result.log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result.log[-1]["loss"] < result.log[0]["loss"] and bank.names == ["policy", "sft"]
    rates = {m.p for m in bank.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert 0.1 in rates  # TRL zeroes the dropout of the model it trains; the bank puts the other adapter's back


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_saved_adapter_reloads_with_the_same_logits(
    tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path, ids, quantization
) -> None:
    bank = ModelBank(str(tiny_model_dir), quantization)
    bank.add("reverse", LORA, seed=1)
    bank.add("forward", LORA, seed=0)
    perturb(bank, "reverse", 1)
    perturb(bank, "forward", 0)
    with bank.use("forward") as model:
        expected = logits(model, ids)
    out = bank.save("forward", tmp_path / "forward", tiny_tokenizer, {"direction": "forward"})
    assert (out / "adapter_model.safetensors").is_file() and (out / models.ADAPTER_CONFIG_FILE).is_file()
    assert not (out / "forward_adapter").exists() and not list(out.glob(".saving-*"))  # peft's subfolder: undone
    reloaded, tokenizer, config = models.load_adapter(out, quantization)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=1e-5)
    assert config["direction"] == "forward" and tokenizer.chat_template == tiny_tokenizer.chat_template
    other = ModelBank(str(tiny_model_dir), quantization)
    other.load("forward", out)
    with other.use("forward") as model:
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    bank.load("forward_again", out)  # into the bank it came from, next to the original
    with bank.use("forward_again") as model:
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)


def test_fresh_and_reloaded_adapters_share_one_preparation(
    tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared, real = [], models.prepare_for_lora

    def spy(model, *args, **kwargs):
        prepared.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(models, "prepare_for_lora", spy)
    source = ModelBank(str(tiny_model_dir), "4bit")
    source.add("a", LORA, seed=0)
    out = source.save("a", tmp_path / "a", tiny_tokenizer, {})
    bank = ModelBank(str(tiny_model_dir), "4bit")
    bank.load("reloaded", out, trainable=True)  # first adapter reloaded, then a fresh one
    bank.add("fresh", LORA, seed=1)
    assert len(prepared) == 2  # one per bank, shared by its fresh and reloaded adapters
    assert models.is_quantized(prepared[1]) and bank.model.get_base_model() is prepared[1]
    models.load_adapter(out, "4bit", is_trainable=True)  # the single-adapter path prepares to train, too
    assert len(prepared) == 3


def test_clear_errors(tiny_model_dir: Path, tiny_tokenizer, tmp_path: Path, load_calls) -> None:
    bank = ModelBank(str(tiny_model_dir), "none")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        bank.load("x", tmp_path / "missing")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / models.ADAPTER_CONFIG_FILE).write_text(json.dumps({"base_model": "someone/other-model"}))
    with pytest.raises(ValueError, match="someone/other-model") as mismatch:
        bank.load("x", foreign)
    assert str(tiny_model_dir) in str(mismatch.value)
    assert load_calls == []  # both refused before any model was loaded
    bank.add("forward", LORA, seed=0)
    bank.add("reverse", LORA, seed=0)
    with pytest.raises(ValueError, match=r"no adapter 'nope'.*'forward', 'reverse'"), bank.use("nope"):
        pass
    with pytest.raises(ValueError, match="already in the bank"):
        bank.add("forward", LORA, seed=0)
    with pytest.raises(ValueError, match="without dots"):
        bank.add("a.b", LORA, seed=0)
    out = bank.save("reverse", tmp_path / "reverse", tiny_tokenizer, {})
    bank.load("frozen", out)
    with pytest.raises(ValueError, match="loaded for inference"), bank.train("frozen"):
        pass


def test_drop_frees_the_adapter_and_the_last_drop_leaves_the_base(tiny_model_dir: Path, ids) -> None:
    bank = ModelBank(str(tiny_model_dir), "none")
    with bank.use(None) as model:
        plain = logits(model, ids)
    bank.add("forward", LORA, seed=0)
    bank.add("reverse", LORA, seed=1)
    perturb(bank, "reverse", 1)
    with bank.use("reverse") as model:
        reverse = logits(model, ids)
    bank.drop("forward")
    assert bank.names == ["reverse"] and not any(".forward_adapter." in k for k, _ in bank.model.named_parameters())
    with bank.use("reverse") as model:
        torch.testing.assert_close(logits(model, ids), reverse, rtol=0, atol=0)
    bank.drop("reverse")
    assert bank.names == [] and not any("lora_" in k for k, _ in bank.model.named_parameters())
    with bank.use(None) as model:
        torch.testing.assert_close(logits(model, ids), plain, rtol=0, atol=0)
    bank.add("again", LORA, seed=0)  # the unwrapped base takes adapters again
    assert bank.names == ["again"]


def test_peak_memory_reports_the_cpu_peak() -> None:
    peak = peak_memory()
    assert peak["cpu_peak_rss_mib"] > 10
    assert ("cuda_max_allocated_mib" in peak) == torch.cuda.is_available()


def test_ensure_reuses_what_the_bank_holds_and_reloads_otherwise(
    tiny_model_dir: Path, tiny_tokenizer, tmp_path
) -> None:
    bank = ModelBank(str(tiny_model_dir), "none")
    bank.add("forward", LORA, seed=0)
    perturb(bank, "forward", seed=1)
    bank.save("forward", tmp_path / "a", tiny_tokenizer, {})
    held = bank.weights("forward")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert bank.ensure("forward", tmp_path / "a") == "forward"  # saved there: kept, not reloaded
    assert bank.weights("forward")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] is held
    perturb(bank, "forward", seed=2)
    bank.save("forward", tmp_path / "b", tiny_tokenizer, {})
    before = {k: v.detach().clone() for k, v in bank.weights("forward").items()}
    bank.ensure("forward", tmp_path / "a")  # another folder: reloaded from it (frozen)
    after = bank.weights("forward")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="loaded for inference"), bank.train("forward"):
        pass
    bank.ensure("forward", tmp_path / "a", trainable=True)  # same folder, but asked trainable: reloaded so
    with bank.train("forward") as model:
        assert any(p.requires_grad for p in model.parameters())
