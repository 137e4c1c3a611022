"""`generate`: our synthesis generation against stock `model.generate` at the same sampling settings.

The model is what synthesis runs on: the base with a LoRA adapter. Stock: one `model.generate` call over the
whole batch, on the stock load (4-bit on CUDA, fp32 on CPU). Ours, on mainlib's default load (4-bit on CUDA, bf16
weights on a CPU with bf16 matrix instructions), in variants, so the run shows what pays:
- `default`: `mainlib.generate.generate_ids` as the library runs it (engine `auto`: `static` on CPU, `hf` on CUDA);
- `hf`: the same with transformers' dynamic cache;
- `merged`: `hf` on `merged_for_inference` (adapter merged into compute-dtype weights, no 4-bit);
- `merged_static`: that with the static KV cache, which transformers compiles with CUDA graphs on CUDA.
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
from mainlib.generate import GenerationSettings, generate_ids, merged_for_inference, resolve_engine
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
    variants: tuple[str, ...] = ("default", "hf", "merged", "merged_static")


VARIANTS: dict[str, tuple[bool, str]] = {  # name -> (adapter merged into a copy, engine)
    "default": (False, "auto"),
    "hf": (False, "hf"),
    "merged": (True, "hf"),
    "merged_static": (True, "static"),
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
    """Stock `generate` on the stock load and each variant on mainlib's default load, timed in turns, with greedy
    checks."""
    path = build_shape(case.shape)
    free_memory()
    stock_model, model = adapted_model(path, stock_quantization()), adapted_model(path, "auto")
    merged = merged_for_inference(model) if any(VARIANTS[v][0] for v in case.variants) else None
    rng = random.Random(3)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(2, vocab) for _ in range(case.prompt_len)] for _ in range(case.batch)]
    paths = {"stock": lambda: stock_generate(stock_model, prompts, case)}
    for variant in case.variants:
        is_merged, engine = VARIANTS[variant]
        target = merged if is_merged else model
        paths[variant] = lambda t=target, e=engine: ours_generate(t, prompts, case, e)
    rates = in_turns({name: lambda f=fn: _new_tokens(f()) for name, fn in paths.items()}, case.warmup, case.repeats)
    record: dict = {"case": asdict(case), "variants": {}, "weights_dtype": str(model.dtype)}
    for name, fn in paths.items():
        result = {**rates[name], "trace": trace(fn)}
        result["new_tokens"] = result.pop("work")
        if name == "stock":
            record["stock"] = result
        else:
            record["variants"][name] = {**result, "speedup": result["tokens_per_s"] / rates["stock"]["tokens_per_s"]}
    record["check"] = greedy_checks(case, stock_model, model, merged, prompts[:8])
    record["ours"] = {**record["variants"][case.variants[0]], "variant": case.variants[0]}
    record["speedup"] = record["ours"]["speedup"]
    record["best"] = max(record["variants"], key=lambda v: record["variants"][v]["speedup"])
    return record


def greedy_checks(case: GenerateCase, stock_model, model, merged, few: list[list[int]]) -> dict:
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
        is_merged, engine = VARIANTS[variant]
        agreement = _agreement(
            ours_generate(merged if is_merged else model, few, greedy_case, engine, False), same_weights
        )
        # Same weights and engine as stock: identical. Merged weights or the static cache's attention over padded
        # columns: rounding may flip a near-tie.
        need = 1.0 if (not is_merged and resolve_engine(settings_for(case, engine)) == "hf") else 0.9
        checks[f"{variant}_greedy_token_agreement"] = {"value": agreement, "at_least": need, "ok": agreement >= need}
    return checks
