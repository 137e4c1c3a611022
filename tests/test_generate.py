"""The generation engine: token-budget batches, input order kept, finish reasons, determinism."""

from __future__ import annotations

import pytest
import torch

from mainlib.generate import GenerationSettings, generate, plan_batches
from mainlib.models import load_model


def test_batches_respect_the_token_budget_and_sort_by_length() -> None:
    lengths = [50, 10, 30, 10, 200, 20]
    settings = GenerationSettings(max_new_tokens=20, token_budget=130, max_batch_size=3)
    batches = plan_batches(lengths, settings)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    for batch in batches:
        widest = max(lengths[i] for i in batch) + settings.max_new_tokens
        assert len(batch) <= 3 and (len(batch) == 1 or len(batch) * widest <= settings.token_budget)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), "none")


def test_same_seed_same_outputs_and_input_order(tiny_model, tiny_tokenizer) -> None:
    prompts = [
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        for text in ["Hi", "Write a long story about a dragon and a knight.", "Name a fruit.", "Why?"]
    ]
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=7, token_budget=64)
    first = generate(tiny_model, tiny_tokenizer, prompts, settings)
    again = generate(tiny_model, tiny_tokenizer, prompts, settings)
    assert first == again
    other = generate(tiny_model, tiny_tokenizer, prompts, GenerationSettings(**{**settings.__dict__, "seed": 8}))
    assert other != first
    # Each output is what the prompt would get alone (greedy, so batching cannot change it).
    greedy = GenerationSettings(max_new_tokens=12, temperature=0.0)
    batched = generate(tiny_model, tiny_tokenizer, prompts, greedy)
    assert batched == [generate(tiny_model, tiny_tokenizer, [p], greedy)[0] for p in prompts]


def test_finish_reasons(tiny_model, tiny_tokenizer) -> None:
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    out = generate(tiny_model, tiny_tokenizer, [prompt], GenerationSettings(max_new_tokens=5, temperature=0.0))[0]
    assert out.finish_reason == "length" and out.new_tokens == 5
    # Make EOS the only possible next token: the model must stop at once.
    eos = tiny_tokenizer.eos_token_id
    head = tiny_model.get_output_embeddings()
    saved = head.weight.data.clone()
    try:
        head.weight.data.zero_()
        head.weight.data[eos] = 1.0
        stopped = generate(tiny_model, tiny_tokenizer, [prompt], GenerationSettings(max_new_tokens=5, temperature=0.0))
    finally:
        head.weight.data.copy_(saved)
    assert stopped[0].finish_reason == "eos" and stopped[0].text == "" and stopped[0].new_tokens == 1


def _prompts(tokenizer, texts):
    return [f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n" for t in texts]


def test_static_cache_engine_writes_what_the_dynamic_one_does(tiny_model, tiny_tokenizer) -> None:
    prompts = _prompts(tiny_tokenizer, ["Hi", "Name a fruit.", "Write a long story about a dragon."])
    greedy = GenerationSettings(max_new_tokens=10, temperature=0.0, engine="hf")
    static = GenerationSettings(max_new_tokens=10, temperature=0.0, engine="static")
    assert generate(tiny_model, tiny_tokenizer, prompts, static) == generate(
        tiny_model, tiny_tokenizer, prompts, greedy
    )


def test_merged_copy_scores_like_the_adapter(tiny_model_dir, tiny_tokenizer) -> None:
    import torch

    from mainlib.generate import merged_for_inference
    from mainlib.models import LoraSettings, add_lora

    peft_model = add_lora(load_model(str(tiny_model_dir), "none"), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B starts at 0: give the adapter something to merge
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    use_cache = peft_model.config.use_cache
    merged = merged_for_inference(peft_model, torch.float32)
    assert not hasattr(merged, "peft_config")
    assert peft_model.config.use_cache == use_cache and merged.config.use_cache  # a config of its own
    assert merged.generation_config.use_cache  # else generate recomputes the whole prefix at every token
    embed = peft_model.get_base_model().get_input_embeddings().weight
    assert merged.get_input_embeddings().weight.data_ptr() == embed.data_ptr()  # untouched weights shared
    ids = torch.tensor([tiny_tokenizer("Name a fruit, please.")["input_ids"]])
    with torch.no_grad():
        want, got, base = (
            m(input_ids=ids).logits for m in (peft_model.eval(), merged, load_model(str(tiny_model_dir)))
        )
    assert (want - base).abs().max() > 1e-2  # the adapter matters ...
    assert torch.allclose(got, want, atol=1e-4)  # ... and the merged copy has it (seen: 3e-5, fp32 rounding)
    prompts = _prompts(tiny_tokenizer, ["Hi", "Name a fruit."])
    greedy = GenerationSettings(max_new_tokens=8, temperature=0.0, engine="hf")
    merged_settings = GenerationSettings(**{**greedy.__dict__, "merge_adapter": True})
    with peft_model.disable_adapter():  # the base: nothing to merge
        assert merged_for_inference(peft_model) is peft_model
    assert generate(peft_model, tiny_tokenizer, prompts, merged_settings) == generate(
        merged, tiny_tokenizer, prompts, greedy
    )


def test_nucleus_sampler_draws_from_the_renormalised_top_p_set() -> None:
    """Greedy over `NucleusSampler`'s output samples the nucleus that transformers' sort-and-cumsum top-p keeps,
    in proportion to the temperature-scaled probabilities (the Gumbel-max trick)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from mainlib.generate import NucleusSampler, nucleus

    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2.0
    temperature, top_p = 0.7, 0.8
    stock = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
    kept = torch.isfinite(stock)[0]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    assert torch.equal(nucleus(logp, top_p)[0], kept)  # here no other token is within 2% of the crossing one

    draws = 20000
    sampler = NucleusSampler(temperature, top_p)
    picks = sampler(None, logits.expand(draws, -1)).argmax(dim=-1)
    counts = torch.bincount(picks, minlength=50).float() / draws
    want = torch.softmax(stock[0], dim=-1)
    assert counts[~kept].sum() == 0
    assert (counts - want).abs().max() < 0.015, (counts - want).abs().max()  # 4 standard errors at p = 0.5
