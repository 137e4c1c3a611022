"""`sft` and `memory`: our weighted SFT against stock TRL `SFTTrainer` defaults (QLoRA nf4, LoRA r16 all-linear).

Both get the same random examples. Stock: `SFTTrainer` with its defaults (gradient checkpointing on, padded
batches) and `peft_config`, on the model as the QLoRA recipe loads it on CUDA (4-bit NF4) and as transformers
does on CPU (fp32). Ours: mainlib's default load (4-bit on CUDA; on a CPU with bf16 matrix instructions, bf16
base weights under fp32 LoRA weights) and `mainlib.sft.make_trainer`, in the
variants below, so one run shows which pays; `ours` is the first variant of the case (the library default
unless the case says otherwise), and every variant's ratios are recorded.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from bench.measure import close, cuda, free_memory, peak_gib, random_examples, ratio, stock_quantization, trace
from bench.shapes import build_shape
from bench.trainers import one_more_step, train_steps
from mainlib.models import (
    LoraSettings,
    Quantization,
    add_lora,
    load_model,
    load_tokenizer,
    lora_config,
    use_checkpointing,
)
from mainlib.prompts import Encoded
from mainlib.sft import SFTSettings, WeightedCollator, make_trainer
from mainlib.training import run_arguments

LORA = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear")


@dataclass(frozen=True)
class Variant:
    """One way to run our trainer. None keeps mainlib's default."""

    gradient_checkpointing: bool | None = None  # None: mainlib's default for the device (on for CPU)
    attn_implementation: str | None = None
    packing: bool | None = None
    liger: bool = False  # Liger's RMSNorm, RoPE and SwiGLU kernels (CUDA, when liger-kernel is installed)
    quantization: Quantization = "auto"  # mainlib's default: 4-bit on CUDA, bf16 weights on a CPU with bf16 matmuls


VARIANTS: dict[str, Variant] = {
    "default": Variant(),  # SDPA, length-grouped padded batches, checkpointing on CPU only
    "uncheckpointed": Variant(gradient_checkpointing=False),
    "unquantized": Variant(quantization="none"),  # the default at the device's full precision (fp32 on CPU)
    "checkpointed": Variant(gradient_checkpointing=True),
    "sdpa_packed": Variant(packing=True),  # packed rows under SDPA: a dense block-diagonal mask
    "sdpa_packed_checkpointed": Variant(gradient_checkpointing=True, packing=True),
    "flex_packed": Variant(attn_implementation="flex_attention"),  # packing follows (varlen kernel)
    "flex_packed_checkpointed": Variant(gradient_checkpointing=True, attn_implementation="flex_attention"),
    "liger": Variant(liger=True),
    "liger_checkpointed": Variant(gradient_checkpointing=True, liger=True),
}


@dataclass
class SFTCase:
    shape: str
    batch_size: int
    lengths: tuple[int, int] = (256, 1024)
    warmup: int = 3
    steps: int = 10
    variants: tuple[str, ...] = ("default",)
    stock: bool = True


def unavailable(variant: Variant) -> str | None:
    """Why `variant` cannot train here, or None."""
    if variant.liger and not cuda():
        return "Liger kernels are Triton kernels: CUDA only"
    if variant.liger and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if variant.attn_implementation == "flex_attention" and not cuda():
        return "FlexAttention has no backward on CPU (torch 2.13)"
    return None


def apply_liger(model) -> None:
    """Swap in Liger's fused RMSNorm, RoPE and SwiGLU on a loaded Llama (before LoRA wraps it).

    Its fused linear + cross-entropy stays off: our loss already scores only target positions in chunks.
    """
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model
    )


def adapted_model(path, quantization: str):
    """The shape loaded with `quantization`, under the same seeded LoRA r16 adapter (the generate and score suites)."""
    torch.manual_seed(0)
    return add_lora(load_model(str(path), quantization), LORA).eval()


def stock_trainer(path, tokenizer, examples: list[Encoded], case: SFTCase, out: str) -> SFTTrainer:
    data = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "completion_mask": [[0] * e.prompt_len + [1] * (len(e.input_ids) - e.prompt_len) for e in examples],
        }
    )
    args = SFTConfig(**run_arguments(out, 0, case.batch_size), max_length=case.lengths[1])
    return SFTTrainer(
        model=load_model(str(path), stock_quantization()),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(LORA),
    )


def our_trainer(path, tokenizer, examples: list[Encoded], case: SFTCase, variant: Variant, out: str):
    data = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": [e.labels for e in examples],
            "weight": [1.0] * len(examples),
            "group": [0] * len(examples),
        }
    )
    settings = SFTSettings(
        batch_size=case.batch_size,
        max_length=case.lengths[1],
        gradient_checkpointing=variant.gradient_checkpointing,
        packing=variant.packing,
    )
    torch.manual_seed(0)
    model = load_model(str(path), variant.quantization, attn_implementation=variant.attn_implementation)
    if variant.liger:
        apply_liger(model)
    model = add_lora(model, LORA, use_checkpointing(variant.gradient_checkpointing))
    return make_trainer(model, tokenizer, data, settings, out)


def packed_equals_padded(trainer, rows: list[dict]) -> dict:
    """The packed loss vs the padded loss of our trainer on the same batch (eval mode: no dropout)."""
    pad = trainer.processing_class.pad_token_id
    packed, padded = (WeightedCollator(pad_token_id=pad, padding_free=flag) for flag in (True, False))
    model = trainer.model
    model.eval()
    with torch.no_grad():
        packed_loss = trainer.compute_loss(model, trainer._prepare_inputs(packed(rows))).item()
        padded_loss = trainer.compute_loss(model, trainer._prepare_inputs(padded(rows))).item()
    model.train()
    tolerance = 1e-5 if next(model.parameters()).dtype == torch.float32 else 2e-2
    return close(packed_loss, padded_loss, rel=tolerance)


def run_case(case: SFTCase) -> dict:
    """Stock, then each of our variants, on the same examples; each measured from a fresh model load."""
    path = build_shape(case.shape)
    tokenizer = load_tokenizer(str(path))
    examples = random_examples(case.batch_size * (case.warmup + case.steps), case.lengths, len(tokenizer), seed=0)
    record: dict = {"case": asdict(case), "lora": asdict(LORA), "variants": {}, "check": {}}
    with tempfile.TemporaryDirectory() as out:
        if case.stock:
            free_memory()
            trainer = stock_trainer(path, tokenizer, examples, case, out)
            record["stock"] = {**train_steps(trainer, case.warmup, case.steps), "peak_gib": peak_gib()}
            record["stock"]["trace"] = trace(lambda t=trainer: one_more_step(t))
            del trainer
        for name in case.variants:
            variant = VARIANTS[name]
            if why := unavailable(variant):
                record["variants"][name] = {"skipped": why}
                continue
            free_memory()
            trainer = our_trainer(path, tokenizer, examples, case, variant, out)
            result = {**train_steps(trainer, case.warmup, case.steps), "peak_gib": peak_gib()}
            result |= {"packed": bool(trainer.data_collator.padding_free), "variant": asdict(variant)}
            if case.stock:
                result["speedup"] = ratio(result["tokens_per_s"], record["stock"]["tokens_per_s"])
                result["memory_ratio"] = ratio(result["peak_gib"], record["stock"]["peak_gib"])
            record["variants"][name] = result
            rows = [trainer.train_dataset[i] for i in range(case.batch_size)]
            record["check"][f"{name}_packed_vs_padded_loss"] = packed_equals_padded(trainer, rows)
            result["trace"] = trace(lambda t=trainer: one_more_step(t))
            del trainer
    free_memory()
    first = case.variants[0]
    record["ours"] = {**record["variants"][first], "name": first}
    if case.stock:
        record["speedup"] = record["ours"].get("speedup")
        record["memory_ratio"] = record["ours"].get("memory_ratio")
    return record
