"""`tdpo`: one token-weighted DPO step against one stock TRL `DPOTrainer` (sigmoid) step on the same data.

Both get the same pre-tokenised pairs (the stock trainer only skips re-tokenising them, as ours does),
TRL's default gradient checkpointing, a fresh LoRA r16 adapter and the base as reference. Stock runs on the
stock load (4-bit on CUDA, fp32 on CPU), ours on mainlib's default load (the same on CUDA, where what is
measured is the cost of the per-token weights; bf16 weights on a CPU with bf16 matrix instructions).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import asdict, dataclass

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from bench.measure import close, free_memory, peak_gib, ratio, stock_quantization, trace
from bench.sft import LORA
from bench.shapes import EOS_ID, PAD_ID, build_shape
from bench.trainers import one_more_step, train_steps
from mainlib.models import load_model, load_tokenizer, lora_config
from mainlib.musc.tdpo import DPOSettings, TokenWeightedCollator, make_trainer
from mainlib.training import run_arguments

STOCK_CHECKPOINTING = DPOConfig.__dataclass_fields__["gradient_checkpointing"].default


@dataclass
class DPOCase:
    shape: str
    batch_size: int = 8
    prompt: tuple[int, int] = (128, 256)
    response: tuple[int, int] = (128, 512)
    warmup: int = 2
    steps: int = 6


class PretokenisedDPOTrainer(DPOTrainer):
    """Stock DPOTrainer that takes already-tokenised pairs as they are (nothing else changed)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def preference_rows(case: DPOCase, vocab: int, seed: int = 2) -> Dataset:
    rng = random.Random(seed)

    def ids(span):
        return [rng.randrange(max(PAD_ID, EOS_ID) + 1, vocab) for _ in range(rng.randint(*span))]

    n = case.batch_size * (case.warmup + case.steps)
    rows: dict[str, list] = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    rows |= {"chosen_weights": [], "rejected_weights": []}
    for _ in range(n):
        rows["prompt_ids"].append(ids(case.prompt))
        for side in ("chosen", "rejected"):
            rows[f"{side}_ids"].append(ids(case.response))
            rows[f"{side}_weights"].append([rng.uniform(0.0, 2.0) for _ in rows[f"{side}_ids"][-1]])
    return Dataset.from_dict(rows)


def _perturb_adapter(model) -> None:
    """The same non-zero LoRA B in both trainers, so policy != reference and the loss is not log 2."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                generator = torch.Generator().manual_seed(sum(map(ord, name)))
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def _loss_on(trainer, rows: list[dict], collator) -> float:
    _perturb_adapter(trainer.model)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(collator(rows))).item()
    trainer.model.train()
    return loss


def run(case: DPOCase) -> dict:
    path = build_shape(case.shape)
    tokenizer = load_tokenizer(str(path))
    data = preference_rows(case, len(tokenizer))
    first = [data[i] for i in range(case.batch_size)]
    unit = [
        dict(r, chosen_weights=[1.0] * len(r["chosen_ids"]), rejected_weights=[1.0] * len(r["rejected_ids"]))
        for r in first
    ]
    record: dict = {"case": asdict(case), "lora": asdict(LORA), "gradient_checkpointing": STOCK_CHECKPOINTING}
    with tempfile.TemporaryDirectory() as out:
        free_memory()
        args = DPOConfig(**run_arguments(out, 0, case.batch_size), loss_type=["sigmoid"])
        stock = PretokenisedDPOTrainer(
            model=load_model(str(path), stock_quantization()),
            args=args,
            train_dataset=data.remove_columns(["chosen_weights", "rejected_weights"]),
            processing_class=tokenizer,
            peft_config=lora_config(LORA),
        )
        # The check first: both adapters are then fresh (same seeded A, same B), before training moves them apart.
        stock_loss = _loss_on(
            stock, [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in first], stock.data_collator
        )
        record["stock"] = {**train_steps(stock, case.warmup, case.steps), "peak_gib": peak_gib()}
        record["stock"]["trace"] = trace(lambda t=stock: one_more_step(t))
        del stock
        free_memory()
        settings = DPOSettings(batch_size=case.batch_size, gradient_checkpointing=STOCK_CHECKPOINTING)

        def ours_on(quantization: str):
            model = load_model(str(path), quantization)
            return make_trainer(model, tokenizer, data, settings, out, peft_config=lora_config(LORA))

        # Weights of 1 must give stock DPO's loss: checked on the stock load, so only the loss code differs.
        ours_loss = _loss_on(
            ours_on(stock_quantization()), unit, TokenWeightedCollator(pad_token_id=tokenizer.pad_token_id)
        )
        free_memory()
        ours = ours_on("auto")  # timed on mainlib's default load
        record["ours"] = {**train_steps(ours, case.warmup, case.steps), "peak_gib": peak_gib()}
        record["ours"]["trace"] = trace(lambda t=ours: one_more_step(t))
        del ours
    free_memory()
    fp32 = stock_quantization() == "none"  # CPU; on CUDA a 4-bit base in bf16: rewards are differences of long sums
    record["check"] = {"unit_weights_loss_vs_stock": close(ours_loss, stock_loss, rel=1e-5 if fp32 else 2e-2)}
    record["step_time_ratio"] = ratio(record["ours"]["step_seconds_median"], record["stock"]["step_seconds_median"])
    record["memory_ratio"] = ratio(record["ours"]["peak_gib"], record["stock"]["peak_gib"])
    return record
