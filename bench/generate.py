"""`generate`: our synthesis generation against stock `model.generate` at the same sampling settings.

The model is what synthesis runs on: the base with a LoRA adapter. Stock: one `model.generate` call over the
whole batch, on the stock load (4-bit on CUDA, fp32 on CPU). Ours, on mainlib's default load (4-bit on CUDA, bf16
weights on a CPU with bf16 matrix instructions), in variants, so the run shows what pays:
- `default`: `mainlib.generate.generate_ids` as the library runs it (engine `auto`: on CPU the static cache, from a
  copy with the adapter merged, made in each call and timed with it; on CUDA `hf` on the adapter model);
- `hf`: the adapter model on transformers' dynamic cache, not merged;
- `static`: the adapter model on the static KV cache, not merged;
- `merged_hf`: a merged copy per call on the dynamic cache.
Paths are timed in turns (stock, each variant, then again), so a slow spell of a shared machine falls on every
path rather than on whichever ran then; each rate is the median over the repeats. `speedup` is the default's
ratio, `best` names the fastest variant; every variant's ratio is recorded.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from bench.measure import free_memory, in_turns, stock_quantization, trace
from bench.sft import adapted_model
from bench.shapes import EOS_ID, PAD_ID, build_shape
from mainlib.generate import GenerationSettings, generate_ids, merges, resolve_engine
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
    repeats: int = 3
    variants: tuple[str, ...] = ("default", "hf", "static", "merged_hf")


VARIANTS: dict[str, tuple[str, bool | None]] = {  # name -> (engine, merge_adapter); None: the library's default
    "default": ("auto", None),
    "hf": ("hf", False),
    "static": ("static", False),
    "merged_hf": ("hf", True),
}


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


def settings_for(case: GenerateCase, engine: str, sample: bool = True, merge: bool | None = None) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=case.new_tokens,
        temperature=case.temperature if sample else 0.0,
        top_p=case.top_p,
        token_budget=case.batch * (case.prompt_len + case.new_tokens),  # the whole batch at once, like stock
        max_batch_size=case.batch,
        engine=engine,
        merge_adapter=merge,
    )


def ours_generate(model, prompts, case: GenerateCase, variant: str, sample: bool = True) -> list[list[int]]:
    engine, merge = VARIANTS[variant]
    outs = generate_ids(model, prompts, settings_for(case, engine, sample, merge), [EOS_ID], PAD_ID, desc=variant)
    return [o.token_ids + ([EOS_ID] if o.finish_reason == "eos" else []) for o in outs]


def _agreement(rows: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions (up to the shorter row) where two greedy generations wrote the same token."""
    agree = sum(a == b for x, y in zip(rows, reference, strict=True) for a, b in zip(x, y, strict=False))
    return agree / sum(min(len(x), len(y)) for x, y in zip(rows, reference, strict=True))


def run(case: GenerateCase) -> dict:
    """Stock `generate` on the stock load and each variant on mainlib's default load, timed in turns, with greedy
    checks."""
    path = build_shape(case.shape)
    free_memory()
    stock_model, model = adapted_model(path, stock_quantization()), adapted_model(path, "auto")
    rng = random.Random(3)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(case.prompt_len)] for _ in range(case.batch)]
    paths = {"stock": lambda: stock_generate(stock_model, prompts, case)}
    for variant in case.variants:
        paths[variant] = lambda v=variant: ours_generate(model, prompts, case, v)
    rates = in_turns({name: lambda f=fn: _new_tokens(f()) for name, fn in paths.items()}, case.warmup, case.repeats)
    record: dict = {"case": asdict(case), "variants": {}, "weights_dtype": str(model.dtype)}
    for name, fn in paths.items():
        result = {**rates[name], "trace": trace(fn)}
        result["new_tokens"] = result.pop("work")
        if name == "stock":
            record["stock"] = result
        else:
            record["variants"][name] = {**result, "speedup": result["tokens_per_s"] / rates["stock"]["tokens_per_s"]}
    record["check"] = greedy_checks(case, stock_model, model, prompts[:8])
    record["ours"] = {**record["variants"][case.variants[0]], "variant": case.variants[0]}
    record["speedup"] = record["ours"]["speedup"]
    record["best"] = max(record["variants"], key=lambda v: record["variants"][v]["speedup"])
    return record


def greedy_checks(case: GenerateCase, stock_model, model, few: list[list[int]]) -> dict:
    """Greedy references: stock `generate` on our load (same weights: our batching must not change a token), and
    on the stock load (fp32 vs bf16 weights on CPU: near-ties of a random-weight model may flip, then diverge)."""
    greedy_case = GenerateCase(**{**asdict(case), "new_tokens": 32})
    with bf16_autocast(model):  # the arithmetic `generate_ids` runs on our load
        same_weights = stock_generate(model, few, greedy_case, sample=False)
    checks: dict = {
        "default_load_vs_stock_load_greedy_agreement": _agreement(
            same_weights, stock_generate(stock_model, few, greedy_case, sample=False)
        )
    }
    for variant in case.variants:
        engine, merge = VARIANTS[variant]
        agreement = _agreement(ours_generate(model, few, greedy_case, variant, sample=False), same_weights)
        # Same weights and engine as stock: identical. Merged weights or the static cache's attention over padded
        # columns: rounding may flip a near-tie.
        settings = settings_for(greedy_case, engine, False, merge)
        exact = resolve_engine(settings) == "hf" and not merges(merge, model)
        need = 1.0 if exact else 0.9
        checks[f"{variant}_greedy_token_agreement"] = {"value": agreement, "at_least": need, "ok": agreement >= need}
    return checks
