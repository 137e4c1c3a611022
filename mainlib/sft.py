"""Weighted SFT of the forward (x -> y) or reverse (y -> x) model with TRL's SFTTrainer.

The MAIN loss mixes seed pairs and synthetic pairs with weight α (ALGORITHMS.md §1):

    L = α · mean_syn(ℓ) + (1 − α) · mean_seed(ℓ)

where ℓ is one example's mean token NLL over its target. It is implemented as a per-example weight
column, not by duplicating rows: with N = N_seed + N_syn examples,

    w_syn = α · N / N_syn,   w_seed = (1 − α) · N / N_seed,   and   mean_i(w_i · ℓ_i) = L.

Check: Σ_syn w·ℓ / N = α · Σ_syn ℓ / N_syn = α · mean_syn(ℓ), and likewise for seed. Each optimiser step
takes this mean over its own examples (micro-batches of equal size, averaged over gradient
accumulation), so a step's expected loss is L; over one full-batch step it is L exactly.

TRL is extended by overriding one method, `compute_loss`; the collator subclass only carries the
`weight` and `group` columns through to it.

Packing: a micro-batch's examples are concatenated into one row with no padding, and `position_ids`
restart at 0 for each example. Transformers turns those restarts into a block-diagonal causal mask
(flash-attention kernels take the sequence boundaries `cu_seq_lens` directly), so no token attends across
examples. Each example's NLL is summed over its own segment of the row (`segment_ids`). With a
variable-length attention kernel (flash-attention, FlexAttention) packing cannot lose: each example attends
only within itself and no pad token is computed. With SDPA the block-diagonal
mask is applied to one dense (T_total x T_total) attention, so whether it pays depends on the shape:
measured on CPU against stock TRL, a tiny Llama (hidden 64, lengths 256-1024, batch 8) ran packed at 0.86x
and length-grouped padded at 1.91x; the SmolLM2-135M shape (lengths 128-512, batch 4) packed at 1.72x and
padded at 1.47x (one run each; CPU timings vary by about 15%). So `packing=None` (default) packs exactly
when the model runs a varlen kernel; `python -m bench sft` measures both on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from mainlib import distributed
from mainlib.adapters import ModelBank
from mainlib.data import Pair
from mainlib.models import LoraSettings, Quantization, use_checkpointing
from mainlib.prompts import Direction, encode
from mainlib.results import write_json
from mainlib.target_head import use_target_head
from mainlib.training import SCHEDULERS, run_arguments, train, use_fast_dropout

SEED, SYNTHETIC = 0, 1  # values of the `group` column


@dataclass
class SFTHyperparameters:
    """What each SFT of a pipeline sets on its own. The run-wide parts (direction, max_length, seed, system
    tags) are in `SFTSettings`, so a pipeline config holds each of them once instead of copying it around."""

    epochs: float = field(default=1.0, metadata={"help": "passes over the data", "range": "(0, inf)"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (LoRA)", "range": "(0, inf)"})
    batch_size: int = field(
        default=8,
        metadata={
            "help": "examples per micro-batch, all processes together (each of N takes 1/N)",
            "range": "[1, inf)",
        },
    )
    grad_accum: int = field(
        default=1,
        metadata={
            "help": "micro-batches per optimiser step (effective batch = batch_size x this)",
            "range": "[1, inf)",
        },
    )
    warmup: float = field(
        default=0.05, metadata={"help": "warm-up steps, or a fraction of all steps if < 1", "range": "[0, inf)"}
    )
    scheduler: str = field(default="cosine", metadata={"help": "transformers lr_scheduler_type", "choices": SCHEDULERS})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "range": "[0, inf)"})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "recompute activations in backward (less memory); None: on for CPU, off for GPU"},
    )
    packing: bool | None = field(
        default=None,
        metadata={"help": "padding-free rows, positions restart per example; None: iff attention is varlen"},
    )
    group_by_length: bool = field(
        default=True, metadata={"help": "batch examples of similar length (less padding); order stays random"}
    )
    logging_steps: int = field(
        default=1, metadata={"help": "optimiser steps between loss records", "range": "[1, inf)"}
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SFTSettings(SFTHyperparameters):
    """One SFT run of one direction. Defaults suit the bundled 135M model on CPU; raise them on a GPU."""

    direction: Direction = field(default="forward", metadata={"help": "forward: x->y; reverse: y->x"})
    max_length: int = field(
        default=512, metadata={"help": "prompt + target tokens; longer targets are cut", "range": "[1, inf)"}
    )
    seed: int = field(default=0, metadata={"help": "data order and dropout"})
    system_seed: str | None = field(default=None, metadata={"help": "system tag for seed examples (Humpback)"})
    system_synthetic: str | None = field(default=None, metadata={"help": "system tag for synthetic examples"})


# --------------------------------------------------------------------------------------------------
# The weighting rule
# --------------------------------------------------------------------------------------------------


def example_weights(n_seed: int, n_synthetic: int, alpha: float) -> tuple[float, float]:
    """(w_seed, w_synthetic) such that mean_i(w_i ℓ_i) = α·mean_syn(ℓ) + (1−α)·mean_seed(ℓ).

    With no synthetic examples the loss is the plain seed mean (w_seed = 1); with no seed examples, the
    synthetic mean.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n = n_seed + n_synthetic
    if n == 0:
        raise ValueError("no examples to weight")
    if n_synthetic == 0:
        return 1.0, 0.0
    if n_seed == 0:
        return 0.0, 1.0
    return (1.0 - alpha) * n / n_seed, alpha * n / n_synthetic


def weight_pairs(seed: Sequence[Pair], synthetic: Sequence[Pair], alpha: float) -> list[tuple[Pair, int]]:
    """Seed and synthetic pairs with their α weights set, each tagged with its group (SEED / SYNTHETIC)."""
    w_seed, w_syn = example_weights(len(seed), len(synthetic), alpha)
    tagged = [(Pair(p.instruction, p.response, p.source, w_seed), SEED) for p in seed]
    tagged += [(Pair(p.instruction, p.response, p.source, w_syn), SYNTHETIC) for p in synthetic]
    return tagged


def per_example_nll(log_probs: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each example's target tokens: (B, T) -> (B,)."""
    return -(log_probs * label_mask).sum(-1) / label_mask.sum(-1).clamp(min=1)


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the packed example each token belongs to: position_ids restart at 0 per example. (1, T) -> (1, T)."""
    return (position_ids == 0).long().cumsum(-1) - 1


def packed_per_example_nll(
    log_probs: torch.Tensor, label_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """`per_example_nll` for one packed row: (1, T-1) next-token log-probs -> (n_examples,).

    log_probs[:, t] scores token t+1, so it belongs to the example of token t+1.
    """
    owner = segment_ids(position_ids)[0, 1:]
    n = int(owner.max()) + 1
    mask = label_mask[0].to(log_probs.dtype)
    total = log_probs.new_zeros(n).index_add(0, owner, log_probs[0] * mask)
    count = mask.new_zeros(n).index_add(0, owner, mask)
    return -total / count.clamp(min=1)


def weighted_loss(per_example: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i(w_i · ℓ_i): equals α·mean_syn + (1−α)·mean_seed for weights from `example_weights`."""
    return (weights.to(per_example.dtype) * per_example).mean()


# --------------------------------------------------------------------------------------------------
# Dataset and TRL extension
# --------------------------------------------------------------------------------------------------


def build_dataset(
    tagged: Sequence[tuple[Pair, int]] | Sequence[Pair],
    tokenizer: PreTrainedTokenizerBase,
    settings: SFTSettings,
) -> tuple[Dataset, dict[str, int]]:
    """Tokenise pairs for the settings' direction into `input_ids`, `labels`, `weight`, `group`.

    Returns the dataset and counts: `examples`, `target_tokens`, and `no_target` (prompt alone fills
    `max_length`; such rows are dropped, since they carry no loss).
    """
    rows: dict[str, list] = {"input_ids": [], "labels": [], "weight": [], "group": []}
    counts = {"examples": 0, "target_tokens": 0, "no_target": 0}
    for item in tagged:
        pair, group = item if isinstance(item, tuple) else (item, SEED)
        system = settings.system_synthetic if group == SYNTHETIC else settings.system_seed
        enc = encode(tokenizer, settings.direction, pair.instruction, pair.response, system, settings.max_length)
        if not enc.target_ids:
            counts["no_target"] += 1
            continue
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append(enc.labels)
        rows["weight"].append(float(pair.weight))
        rows["group"].append(int(group))
        counts["examples"] += 1
        counts["target_tokens"] += len(enc.target_ids)
    if counts["examples"] == 0:
        raise ValueError(f"no example has target tokens within max_length={settings.max_length}; raise max_length")
    check_weights(rows["weight"])
    return Dataset.from_dict(rows), counts


def check_weights(weights: Sequence[float]) -> None:
    """Finite weights >= 0, not all 0: a NaN weight trains a NaN adapter, a negative one trains by gradient ascent,
    and all zeros train nothing, each without any other sign (pairs built in Python skip the file checks)."""
    for i, weight in enumerate(weights):
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"example {i} has weight {weight}; weights must be finite and >= 0")
    if not any(weights):
        raise ValueError("every example has weight 0, so there is nothing to train on")


class WeightedCollator(DataCollatorForLanguageModeling):
    """TRL's collator (padded, or packed with `padding_free=True`), plus the per-example `weight` and `group`
    columns as tensors."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["weight"] = torch.tensor([float(e["weight"]) for e in examples])
        batch["group"] = torch.tensor([int(e["group"]) for e in examples])
        return batch


class WeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the per-example-weighted mean of per-example target NLL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Our loss is a mean over this micro-batch's examples: let Trainer divide by the accumulation steps.
        self.loss_is_scaled_for_ga = False

    def _get_train_sampler(self, train_dataset=None):
        """Length groups the size of the global batch (all processes), not of one process's share: batch k then
        holds the same examples at any process count (Trainer sizes them per process)."""
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            sampler.batch_size *= self.accelerator.num_processes
        return sampler

    @torch.no_grad()
    def _log_metrics(self, mode: str, per_example, groups, is_top1, mask, inputs: dict, packed: bool) -> None:
        """Each group's unweighted mean loss, token accuracy and tokens seen, summed over all processes in one
        reduce (so the log is the whole global batch's, not the main process's share); TRL's `log` averages them
        over the micro-batches of a logging step."""
        ids = inputs["input_ids"]
        real = ids.new_tensor(ids.numel()) if packed else inputs["attention_mask"].sum()  # tokens, pads excluded
        correct = (is_top1 * mask).sum() if is_top1 is not None else mask.new_zeros(())
        parts = [per_example[groups == SEED].sum(), (groups == SEED).sum(), per_example[groups == SYNTHETIC].sum()]
        parts += [(groups == SYNTHETIC).sum(), correct, mask.sum(), real]
        totals = self.accelerator.reduce(torch.stack([p.float() for p in parts]), "sum").tolist()
        seed_sum, seed_n, synthetic_sum, synthetic_n, correct_n, target_n, real_n = totals
        for name, total, n in (("seed_loss", seed_sum, seed_n), ("synthetic_loss", synthetic_sum, synthetic_n)):
            if n:
                self._metrics[mode][name].append(total / n)
        if is_top1 is not None:
            self._metrics[mode]["mean_token_accuracy"].append(correct_n / max(target_n, 1))
        if mode == "train":
            self._total_train_tokens += int(real_n)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        weights, groups = inputs.pop("weight"), inputs.pop("group")
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)  # per-token log p, no full logits
        mask = outputs.label_mask.to(outputs.log_probs.dtype)
        packed = "attention_mask" not in inputs
        if packed:
            per_example = packed_per_example_nll(outputs.log_probs, mask, inputs["position_ids"])
        else:
            per_example = per_example_nll(outputs.log_probs, mask)
        loss = weighted_loss(per_example, weights)

        self._log_metrics(mode, per_example, groups, outputs.is_top1, mask, inputs, packed)
        return (loss, outputs) if return_outputs else loss


# --------------------------------------------------------------------------------------------------
# One training run
# --------------------------------------------------------------------------------------------------


@dataclass
class SFTResult:
    """What one SFT run did: its loss curve (one row per logging step) and its size and time."""

    direction: str
    losses: list[dict[str, float]]
    counts: dict[str, int]
    seconds: float
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def loss_values(self) -> list[float]:
        return [row["loss"] for row in self.losses]


def sft_config(settings: SFTSettings, output_dir: str | Path, weights: torch.dtype | None = None) -> SFTConfig:
    """The TRL config for `settings`: no checkpoints on disk, no external loggers, precision for the device and the
    base `weights` (see `run_arguments`)."""
    return SFTConfig(
        **run_arguments(output_dir, settings.seed, settings.batch_size, weights),
        num_train_epochs=settings.epochs,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup,
        weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps,
        max_length=settings.max_length,
        gradient_checkpointing=use_checkpointing(settings.gradient_checkpointing),
        remove_unused_columns=False,  # keep `weight` and `group` for the collator
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
    )


VARLEN_ATTENTION = ("flash_attention", "flex_attention")


def packing_pays(model) -> bool:
    """Whether the model's attention kernel skips cross-example blocks (flash / flex attention), so packing pays."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation = str(getattr(inner.config, "_attn_implementation", "") or "")
    return any(name in implementation for name in VARLEN_ATTENTION)


def make_trainer(
    model, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, settings: SFTSettings, output_dir: str | Path
) -> WeightedSFTTrainer:
    """The weighted trainer over a dataset from `build_dataset`."""
    packing = packing_pays(model) if settings.packing is None else settings.packing
    trainer = WeightedSFTTrainer(
        model=model,
        args=sft_config(settings, output_dir, model.dtype),
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=WeightedCollator(pad_token_id=tokenizer.pad_token_id, padding_free=packing),
    )
    use_fast_dropout(trainer.model)
    use_target_head(trainer.model)
    return trainer


def train_sft(
    model,
    tokenizer: PreTrainedTokenizerBase,
    data: Sequence[tuple[Pair, int]] | Sequence[Pair],
    settings: SFTSettings,
    output_dir: str | Path,
) -> SFTResult:
    """Train `model` (a PeftModel with a trainable adapter) in place on `data`; return the loss curve.

    `data` is either plain pairs (all seed, weights as given) or `weight_pairs(seed, synthetic, alpha)`.
    """
    set_seed(settings.seed)
    dataset, counts = build_dataset(data, tokenizer, settings)
    trainer = make_trainer(model, tokenizer, dataset, settings, output_dir)
    keep = ("step", "epoch", "loss", "learning_rate", "seed_loss", "synthetic_loss", "mean_token_accuracy")
    losses, steps, seconds = train(trainer, keep)
    counts = {**counts, "optimizer_steps": steps}
    return SFTResult(settings.direction, losses, counts, seconds, settings.to_dict())


def train_bank_adapter(
    bank: ModelBank,
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    data: Sequence[tuple[Pair, int]] | Sequence[Pair],
    settings: SFTSettings,
    out_dir: str | Path,
    config: dict[str, Any] | None = None,
) -> SFTResult:
    """Train the bank's adapter `name` (only it: the other adapters and the base stay frozen) on `data`, and save
    it to `out_dir` with `config` (plus the SFT settings) and its loss curve, `sft_result.json`."""
    with bank.train(name) as model:
        result = train_sft(model, tokenizer, data, settings, Path(out_dir) / "trainer")
    bank.save(name, out_dir, tokenizer, {**(config or {}), "sft": settings.to_dict()})
    distributed.on_main(lambda: write_json(Path(out_dir) / "sft_result.json", result.to_dict()))
    return result


def train_adapter(
    base_model: str,
    tokenizer: PreTrainedTokenizerBase,
    data: Sequence[tuple[Pair, int]] | Sequence[Pair],
    settings: SFTSettings,
    lora: LoraSettings,
    out_dir: str | Path,
    quantization: Quantization = "auto",
):
    """Load `base_model`, add a fresh LoRA adapter, train it, and save it (with its config) to `out_dir`.

    Returns (peft_model, SFTResult), the adapter active and trainable. The adapter directory also holds
    `sft_result.json` (the loss curve). A bank of its own: `train_bank_adapter` trains one adapter of a shared bank.
    """
    set_seed(settings.seed)
    bank = ModelBank(base_model, quantization, settings.gradient_checkpointing)
    bank.add("default", lora, seed=settings.seed)  # the LoRA initialisation is random too
    result = train_bank_adapter(bank, "default", tokenizer, data, settings, out_dir, {"lora": asdict(lora)})
    model = bank.model
    model.set_adapter("default")  # callers train the returned model further (MAIN's rounds)
    return model, result
