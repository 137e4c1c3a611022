"""`sft` and `memory`: our weighted SFT against stock TRL `SFTTrainer` defaults (QLoRA nf4, LoRA r16 all-linear).

Both load the model the same way (`mainlib.models.load_model`: 4-bit NF4 on CUDA, full precision on CPU)
and get the same random examples; what differs is the trainer. Stock: `SFTTrainer` with its defaults
(gradient checkpointing on, padded batches) and `peft_config`. Ours: `mainlib.sft.make_trainer` with
packed (padding-free) batches and no gradient checkpointing unless asked.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from bench.measure import close, free_memory, peak_gib, random_examples, ratio
from bench.shapes import build_shape
from bench.trainers import train_steps
from mainlib.models import LoraSettings, add_lora, load_model, load_tokenizer, lora_config
from mainlib.prompts import Encoded
from mainlib.sft import SFTSettings, WeightedCollator, make_trainer
from mainlib.training import run_arguments

LORA = LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear")


@dataclass
class SFTCase:
    shape: str
    batch_size: int
    lengths: tuple[int, int] = (256, 1024)
    warmup: int = 3
    steps: int = 10
    gradient_checkpointing: bool = False  # ours; stock keeps TRL's default (on)
    packing: bool | None = None  # ours; None: mainlib's default for this machine


def stock_trainer(path, tokenizer, examples: list[Encoded], case: SFTCase, out: str) -> SFTTrainer:
    data = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "completion_mask": [[0] * e.prompt_len + [1] * (len(e.input_ids) - e.prompt_len) for e in examples],
        }
    )
    args = SFTConfig(**run_arguments(out, 0), per_device_train_batch_size=case.batch_size, max_length=case.lengths[1])
    return SFTTrainer(
        model=load_model(str(path)),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(LORA),
    )


def our_trainer(path, tokenizer, examples: list[Encoded], case: SFTCase, out: str):
    data = Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": [e.labels for e in examples],
            "weight": [1.0] * len(examples),
            "group": [0] * len(examples),
        }
    )
    settings = SFTSettings(
        batch_size=case.batch_size, max_length=case.lengths[1], gradient_checkpointing=case.gradient_checkpointing
    )
    if case.packing is not None:
        settings.packing = case.packing
    torch.manual_seed(0)
    model = add_lora(load_model(str(path)), LORA, case.gradient_checkpointing)
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


def run_case(case: SFTCase, stock: bool = True) -> dict:
    """Stock then ours on the same examples; each measured from a fresh model load."""
    path = build_shape(case.shape)
    tokenizer = load_tokenizer(str(path))
    examples = random_examples(case.batch_size * (case.warmup + case.steps), case.lengths, len(tokenizer), seed=0)
    record: dict = {"case": asdict(case), "lora": asdict(LORA)}
    with tempfile.TemporaryDirectory() as out:
        if stock:
            free_memory()
            trainer = stock_trainer(path, tokenizer, examples, case, out)
            record["stock"] = {**train_steps(trainer, case.warmup, case.steps), "peak_gib": peak_gib()}
            del trainer
        free_memory()
        trainer = our_trainer(path, tokenizer, examples, case, out)
        record["ours"] = {**train_steps(trainer, case.warmup, case.steps), "peak_gib": peak_gib()}
        record["ours"]["packed"] = bool(trainer.data_collator.padding_free)
        rows = [trainer.train_dataset[i] for i in range(case.batch_size)]
        record["check"] = {"packed_vs_padded_loss": packed_equals_padded(trainer, rows)}
        del trainer
    free_memory()
    if stock:
        record["speedup"] = ratio(record["ours"]["tokens_per_s"], record["stock"]["tokens_per_s"])
        record["memory_ratio"] = ratio(record["ours"]["peak_gib"], record["stock"]["peak_gib"])
    return record
