"""Token-weighted DPO (ALGORITHMS.md §2, fine granularity): TRL's `DPOTrainer` with per-token weights.

    r_w = β Σ_t w_{w,t} (log πθ(y_{w,t}) − log πref(y_{w,t}))        (the same for r_l)
    loss = −log σ(r_w − r_l)

TRL 1.16 computes every per-sequence log-probability from `model(..., fused_lm_head=True).log_probs`
(one row per sequence, one column per next-token position) and sums it, in `_compute_loss` for the policy
and the reference and in `compute_ref_log_probs` when reference log-probs are precomputed. So the weights
enter in one place: a forward hook on the model multiplies those per-token log-probs by w_t while a
weighted batch is being scored. Σ_t w_t log πθ − Σ_t w_t log πref = Σ_t w_t (log πθ − log πref), so the
sigmoid loss, and TRL's logged rewards, margins and accuracies, are the weighted ones; with w ≡ 1 this is
plain DPO. (TRL's `logps/*` metrics are weighted sums too. Loss types that read other fields, like the
WPO weighting, are not weighted.)

The dataset is tokenised here, by `prompts.encode` (the tokenisation the weights were computed on), so the
weights line up with the tokens by construction: TRL's own tokenisation is skipped for it.
The reference is the policy's starting point without a second model in memory: with a fresh adapter, the
base with the adapter disabled; when the policy already has a trained adapter (a MAIN model), TRL keeps a
frozen copy of that adapter as "ref". `train_bank_tdpo` trains one named adapter of a `ModelBank` the same
way: the base with adapters disabled, or a frozen copy of the adapter in the same bank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, set_seed
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from mainlib.adapters import ModelBank
from mainlib.models import use_checkpointing
from mainlib.prompts import encode
from mainlib.target_head import use_target_head
from mainlib.training import SCHEDULERS, run_arguments, train, use_fast_dropout


@dataclass
class DPOSettings:
    """Token-weighted DPO hyperparameters. Defaults: the MuSC public config (ALGORITHMS.md §2)."""

    beta: float = field(default=0.1, metadata={"help": "DPO temperature β", "range": "(0, inf)"})
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate", "range": "(0, inf)"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the preference pairs", "range": "(0, inf)"})
    batch_size: int = field(
        default=8,
        metadata={"help": "pairs per micro-batch, all processes together (each of N takes 1/N)", "range": "[1, inf)"},
    )
    grad_accum: int = field(
        default=1,
        metadata={
            "help": "micro-batches per optimizer step (effective batch = batch_size x this)",
            "range": "[1, inf)",
        },
    )
    scheduler: str = field(
        default="cosine", metadata={"help": "transformers learning-rate schedule", "choices": SCHEDULERS}
    )
    warmup: float = field(
        default=0.1, metadata={"help": "warm-up: a share of the steps (< 1) or a step count", "range": "[0, inf)"}
    )
    max_length: int = field(
        default=2048,
        metadata={"help": "prompt + response tokens; responses are cut at the end", "range": "[1, inf)"},
    )
    logging_steps: int = field(default=1, metadata={"help": "log every N optimizer steps", "range": "[1, inf)"})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "recompute activations in backward (less memory); None: on for CPU, off for GPU"},
    )
    seed: int = field(default=0, metadata={"help": "data order and initialisation seed"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Data: pre-tokenised pairs with their weights
# --------------------------------------------------------------------------------------------------


def preference_dataset(
    rows: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[Dataset, dict[str, int]]:
    """TRL's tokenised preference columns plus `chosen_weights` / `rejected_weights`, one weight per token.

    Each row holds `prompt`, `chosen`, `rejected` and, optionally, `chosen_weights` / `rejected_weights`
    as stored by the `token_weights` stage ({"token_ids": [...], "weights": [...]}); missing weights mean
    plain DPO (all 1). The token ids stored with the weights must be the ones `prompts.encode` gives now.
    """
    columns: dict[str, list] = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    columns |= {"chosen_weights": [], "rejected_weights": []}
    counts = {"pairs": len(rows), "prompt_too_long": 0, "responses_cut": 0}
    for i, row in enumerate(rows):
        chosen = encode(tokenizer, "forward", row["prompt"], row["chosen"])
        rejected = encode(tokenizer, "forward", row["prompt"], row["rejected"])
        prompt_ids = chosen.input_ids[: chosen.prompt_len]
        if len(prompt_ids) >= max_length:
            counts["prompt_too_long"] += 1
            continue
        room = max_length - len(prompt_ids)
        for side, enc in (("chosen", chosen), ("rejected", rejected)):
            stored = row.get(f"{side}_weights")
            if stored is None:
                weights = [1.0] * len(enc.target_ids)
            else:
                if list(stored["token_ids"]) != enc.target_ids:
                    raise ValueError(
                        f"pair {i}: the {side} weights were computed on another tokenisation of the response "
                        "(different tokenizer or template); recompute the token_weights stage"
                    )
                weights = [float(w) for w in stored["weights"]]
                if not all(math.isfinite(w) and w >= 0 for w in weights):
                    raise ValueError(
                        f"pair {i}: the {side} token weights must be finite and >= 0; recompute the token_weights stage"
                    )
            counts["responses_cut"] += len(enc.target_ids) > room
            columns[f"{side}_ids"].append(enc.target_ids[:room])
            columns[f"{side}_weights"].append(weights[:room])
        columns["prompt_ids"].append(prompt_ids)
    if not columns["prompt_ids"]:
        raise ValueError(f"no preference pair has a prompt shorter than max_length={max_length}")
    counts["kept"] = len(columns["prompt_ids"])
    return Dataset.from_dict(columns), counts


@dataclass
class TokenWeightedCollator(DataCollatorForPreference):
    """TRL's preference collator, plus `token_weights` aligned with `input_ids` (0 on prompt and padding)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        rows = [
            [0.0] * len(e["prompt_ids"]) + list(e[f"{side}_weights"])
            for side in ("chosen", "rejected")
            for e in examples
        ]
        if self.max_length is not None:  # the same cut as the parent's keep_start truncation
            rows = [r[: self.max_length] for r in rows]
        weights = pad(
            [torch.tensor(r, dtype=torch.float32) for r in rows],
            padding_value=0.0,
            padding_side="right",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        if weights.shape != batch["input_ids"].shape:
            raise ValueError(
                f"token weights {tuple(weights.shape)} do not match input_ids {tuple(batch['input_ids'].shape)}"
            )
        batch["token_weights"] = weights
        return batch


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class TokenWeightedDPOTrainer(DPOTrainer):
    """DPOTrainer whose per-token log-probs are multiplied by the batch's `token_weights` before TRL sums them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._active_weights: torch.Tensor | None = None
        self.accelerator.unwrap_model(self.model).register_forward_hook(self._weigh_log_probs)

    def _weigh_log_probs(self, module, args, output):
        """Forward hook: log p(y_t) -> w_t log p(y_t) while a weighted batch is scored (policy and reference)."""
        if self._active_weights is None or getattr(output, "log_probs", None) is None:
            return None
        log_probs = output.log_probs  # (2B, T−1): position t scores token t+1
        shifted = self._active_weights[:, 1:].to(device=log_probs.device, dtype=log_probs.dtype)
        output.log_probs = log_probs * shifted[:, -log_probs.size(1) :]
        return output

    @contextmanager
    def _weighted(self, inputs: dict[str, Any]) -> Iterator[None]:
        self._active_weights = inputs.pop("token_weights", None)
        try:
            yield
        finally:
            self._active_weights = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:  # tokenised by `preference_dataset`, weights aligned: keep it
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "chosen_weights", "rejected_weights"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._weighted(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def compute_ref_log_probs(self, model, inputs):
        with self._weighted(inputs):
            return super().compute_ref_log_probs(model, inputs)


def dpo_config(settings: DPOSettings, output_dir: str | Path, weights: torch.dtype | None = None) -> DPOConfig:
    """The TRL config: sigmoid loss, no checkpoints on disk, no external loggers, precision for the device and the
    base `weights` (see `run_arguments`)."""
    return DPOConfig(
        **run_arguments(output_dir, settings.seed, settings.batch_size, weights),
        beta=settings.beta,
        loss_type=["sigmoid"],
        num_train_epochs=settings.epochs,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup,
        logging_steps=settings.logging_steps,
        max_length=None,  # `preference_dataset` already cut every pair to settings.max_length
        gradient_checkpointing=use_checkpointing(settings.gradient_checkpointing),
    )


def make_trainer(
    model,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    settings: DPOSettings,
    output_dir: str | Path,
    peft_config=None,
) -> TokenWeightedDPOTrainer:
    """The trainer over a `preference_dataset`. Pass a plain model with `peft_config`, or a PeftModel."""
    trainer = TokenWeightedDPOTrainer(
        model=model,
        args=dpo_config(settings, output_dir, model.dtype),
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=TokenWeightedCollator(pad_token_id=tokenizer.pad_token_id),
        peft_config=peft_config,
    )
    use_fast_dropout(trainer.model)
    use_target_head(trainer.model)
    return trainer


@dataclass
class DPOResult:
    """One training run: TRL's log rows (loss, rewards, margins, accuracies per step), sizes and time."""

    log: list[dict[str, float]]
    counts: dict[str, int]
    seconds: float
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def final(self, key: str, last: int = 3) -> float | None:
        """The mean of `key` over the last `last` logged steps (a less noisy end value)."""
        values = [row[key] for row in self.log if key in row][-last:]
        return sum(values) / len(values) if values else None


LOG_KEYS = (
    "step",
    "epoch",
    "loss",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def _fit(
    make: Callable[[Dataset], TokenWeightedDPOTrainer],
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    settings: DPOSettings,
) -> tuple[TokenWeightedDPOTrainer, DPOResult]:
    """Tokenise the rows, build the trainer with `make`, train; the one training loop of both entry points."""
    set_seed(settings.seed)
    dataset, counts = preference_dataset(rows, tokenizer, settings.max_length)
    trainer = make(dataset)
    log, steps, seconds = train(trainer, LOG_KEYS)
    counts = {**counts, "optimizer_steps": steps}
    return trainer, DPOResult(log, counts, seconds, settings.to_dict())


def train_tdpo(
    model,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    settings: DPOSettings,
    output_dir: str | Path,
    peft_config=None,
):
    """Train on preference rows (see `preference_dataset`); returns (trained PeftModel, DPOResult)."""
    trainer, result = _fit(
        lambda dataset: make_trainer(model, tokenizer, dataset, settings, output_dir, peft_config),
        tokenizer,
        rows,
        settings,
    )
    return trainer.model, result


# --------------------------------------------------------------------------------------------------
# An adapter of a ModelBank: the reference is the base, or a frozen copy in the same bank
# --------------------------------------------------------------------------------------------------

# TRL 1.16 scores the reference of a PeftModel with the adapter of this name active, or with all adapters
# disabled when there is none (trl/trainer/dpo_trainer.py, `compute_ref_log_probs` and `_compute_loss`).
REFERENCE = "ref"


def starts_at_base(bank: ModelBank, name: str) -> bool:
    """Whether adapter `name` changes nothing yet: every LoRA B is zero, as peft initialises a fresh adapter."""
    return not any(w.any() for key, w in bank.weights(name).items() if ".lora_B." in key)


def _bank_trainer(model, tokenizer, dataset: Dataset, settings: DPOSettings, output_dir) -> TokenWeightedDPOTrainer:
    """`make_trainer` for a PeftModel whose adapters have names of their own (a ModelBank's).

    Given a PeftModel, TRL 1.16's DPOTrainer reads the adapter named "default" and adds a copy of it as "ref"
    (dpo_trainer.py, `__init__`); with no "default" it fails. The bank chooses the reference itself, so while
    TRL builds, the trained adapter's config is shown under "default", and TRL's copy is dropped afterwards.
    """
    aliased = "default" not in model.peft_config
    if aliased:
        model.peft_config["default"] = model.peft_config[model.active_adapter]
    try:
        trainer = make_trainer(model, tokenizer, dataset, settings, output_dir)
    finally:
        if aliased:
            del model.peft_config["default"]
    if REFERENCE in model.peft_config:
        model.delete_adapter(REFERENCE)
    return trainer


def train_bank_tdpo(
    bank: ModelBank,
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    settings: DPOSettings,
    output_dir: str | Path,
) -> DPOResult:
    """Train the bank's adapter `name` (only it) with token-weighted DPO against its own starting point.

    The reference needs no second base: when `name` starts at the base (a fresh adapter) it is the base with
    adapters disabled; otherwise a frozen copy of `name`, held in the bank as "ref" for the run only.
    """
    if REFERENCE in bank.names:
        raise ValueError(f"the bank holds an adapter named {REFERENCE!r}: TRL reserves that name for the reference")
    from_base = starts_at_base(bank, name)
    with bank.train(name) as model:

        def make(dataset: Dataset) -> TokenWeightedDPOTrainer:
            trainer = _bank_trainer(model, tokenizer, dataset, settings, output_dir)
            if not from_base:  # copied after TRL's set-up, which may cast the trained weights (QLoRA: bf16)
                bank.copy(name, REFERENCE)
            return trainer

        try:
            _, result = _fit(make, tokenizer, rows, settings)
        finally:
            if REFERENCE in bank.names:
                bank.drop(REFERENCE)
    return result
