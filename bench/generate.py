"""`generate`: our synthesis generation against stock `model.generate` at the same sampling settings.

The model is what synthesis runs on: the base with a LoRA adapter. Stock: one `model.generate` call over the
whole batch, on the stock load (4-bit on CUDA, fp32 on CPU). Ours, on mainlib's default load (4-bit on CUDA, bf16
weights on a CPU with bf16 matrix instructions), in variants, so the run shows what pays:
- `hf`: `mainlib.generate.generate_ids` on the adapter model (token-budget batches, same engine);
- `merged`: the same on `merged_for_inference` (adapter merged into compute-dtype weights, no 4-bit);
- `merged_static`: that with the static KV cache, which transformers compiles with CUDA graphs on CUDA.
`speedup` is the best variant's ratio; every variant's is recorded.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from bench.measure import free_memory, peak_gib, stock_quantization, timed, trace
from bench.sft import adapted_model
from bench.shapes import EOS_ID, PAD_ID, build_shape
from mainlib.generate import GenerationSettings, generate_ids, merged_for_inference
from mainlib.models import bf16_autocast


@dataclass
class GenerateCase:
    shape: str
    batch: int = 64
    prompt_len: int = 256
    new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    warmup: int = 1
    repeats: int = 2
    variants: tuple[str, ...] = ("hf", "merged", "merged_static")


def _new_tokens(rows: list[list[int]]) -> int:
    """Tokens written, up to and including the first EOS of each row."""
    return sum(row.index(EOS_ID) + 1 if EOS_ID in row else len(row) for row in rows)


def stock_generate(model, prompts: list[list[int]], case: GenerateCase, sample: bool = True) -> list[list[int]]:
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=sample,
        temperature=case.temperature if sample else None,
        top_p=case.top_p if sample else None,
        top_k=None,
        max_new_tokens=case.new_tokens,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    return out[:, ids.shape[1] :].tolist()


def settings_for(case: GenerateCase, engine: str, sample: bool = True) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=case.new_tokens,
        temperature=case.temperature if sample else 0.0,
        top_p=case.top_p,
        token_budget=case.batch * (case.prompt_len + case.new_tokens),  # the whole batch at once, like stock
        max_batch_size=case.batch,
        engine=engine,
    )


def ours_generate(model, prompts, case: GenerateCase, engine: str, sample: bool = True) -> list[list[int]]:
    outs = generate_ids(model, prompts, settings_for(case, engine, sample), [EOS_ID], PAD_ID, desc=engine)
    return [o.token_ids + ([EOS_ID] if o.finish_reason == "eos" else []) for o in outs]


def _agreement(rows: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions (up to the shorter row) where two greedy generations wrote the same token."""
    agree = sum(a == b for x, y in zip(rows, reference, strict=True) for a, b in zip(x, y, strict=False))
    return agree / sum(min(len(x), len(y)) for x, y in zip(rows, reference, strict=True))


def run(case: GenerateCase) -> dict:
    """Stock `generate` on the stock load, then each variant on mainlib's default load, with greedy checks."""
    path = build_shape(case.shape)
    free_memory()
    stock_model, model = adapted_model(path, stock_quantization()), adapted_model(path, "auto")
    rng = random.Random(3)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(case.prompt_len)] for _ in range(case.batch)]
    record: dict = {"case": asdict(case), "variants": {}, "weights_dtype": str(model.dtype)}

    def measure(fn) -> dict:
        written: list[int] = []
        free_memory()
        timing = timed(lambda i: written.append(_new_tokens(fn())), case.warmup, case.repeats)
        tokens = sum(written[case.warmup :])
        return {
            "seconds": timing.total,
            "new_tokens": tokens,
            "tokens_per_s": tokens / timing.total,
            "peak_gib": peak_gib(),
        }

    record["stock"] = measure(lambda: stock_generate(stock_model, prompts, case))
    record["stock"]["trace"] = trace(lambda: stock_generate(stock_model, prompts, case))
    few = prompts[:8]
    greedy_case = GenerateCase(**{**asdict(case), "new_tokens": 32})
    # Greedy references: stock `generate` on our load (same weights: our batching must not change a token), and
    # on the stock load (fp32 vs bf16 weights on CPU: near-ties of a random-weight model may flip, then diverge).
    with bf16_autocast(model):  # the arithmetic `generate_ids` runs on our load
        same_weights = stock_generate(model, few, greedy_case, sample=False)
    checks = {
        "default_load_vs_stock_load_greedy_agreement": _agreement(
            same_weights, stock_generate(stock_model, few, greedy_case, sample=False)
        )
    }
    merged = None
    for variant in case.variants:
        engine = "static" if variant.endswith("static") else "hf"
        if variant.startswith("merged") and merged is None:
            merged = merged_for_inference(model)
        target = merged if variant.startswith("merged") else model
        record["variants"][variant] = measure(lambda t=target, e=engine: ours_generate(t, prompts, case, e))
        record["variants"][variant]["trace"] = trace(lambda t=target, e=engine: ours_generate(t, prompts, case, e))
        agreement = _agreement(ours_generate(target, few, greedy_case, engine, sample=False), same_weights)
        # Same weights and engine: identical. Merged weights or another engine: rounding may flip a near-tie.
        need = 1.0 if variant == "hf" else 0.9
        checks[f"{variant}_greedy_token_agreement"] = {"value": agreement, "at_least": need, "ok": agreement >= need}
        record["variants"][variant]["speedup"] = (
            record["variants"][variant]["tokens_per_s"] / record["stock"]["tokens_per_s"]
        )
    best = max(record["variants"], key=lambda v: record["variants"][v]["speedup"])
    record["ours"] = {**record["variants"][best], "variant": best}
    record["speedup"] = record["ours"]["speedup"]
    record["check"] = checks
    return record
