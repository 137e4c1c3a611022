"""lm-eval's `HFLM` with greedy generation through `mainlib.continuous` (continuous batching).

One method is overridden, `generate_until`: requests are grouped by their generation settings as `HFLM`
groups them, encoded and truncated by `HFLM`'s own `tok_batch_encode`, stopped at the same stop strings and
EOS, decoded and post-processed by `HFLM`'s own functions, and reported to lm-eval's request cache one by
one (`use_cache` resumes an interrupted run). Sampling, thinking-token models and `slots=0` take the stock
path (`HFLM.generate_until`).

Built from a model name (not a loaded model) under `accelerate launch` / torchrun, it also takes part in
lm-eval's data parallelism on CPU processes and one-GPU-per-process set-ups, where HFLM itself would leave
every process at rank 0 of 1 (see `_join_process_group`).
"""

from __future__ import annotations

import json
from typing import Any

from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from mainlib.continuous import greedy_generate

STOP_LOOKBACK = 16  # tokens decoded each step to look for a stop string at the end of a row


class ContinuousHFLM(HFLM):
    """`HFLM` whose greedy `generate_until` decodes `slots` rows together with continuous batching."""

    def __init__(self, *args: Any, slots: int = 16, quantization_config: Any = None, **kwargs: Any) -> None:
        self._quantization = quantization_config  # read by `_create_model`, which HFLM calls from its __init__
        super().__init__(*args, **kwargs)
        self.slots = slots
        self._join_process_group()

    def _create_model(self, *args: Any, quantization_config: Any = None, **kwargs: Any) -> None:
        """HFLM hands `from_pretrained` only the quantization stored in the model's own config; mainlib's 4-bit
        load of a full-precision checkpoint needs ours (lm-eval: "consider subclassing HFLM and overriding this")."""
        super()._create_model(*args, quantization_config=self._quantization or quantization_config, **kwargs)

    def _join_process_group(self) -> None:
        """Shard lm-eval's requests over the processes of `accelerate launch` / torchrun.

        HFLM keeps the launcher's `Accelerator` whenever there are several processes
        (lm_eval/models/huggingface.py:252-254) but sets rank and world size from it only when it counts more
        than one CUDA device (huggingface.py:465-487); on CPU (gloo) every process stays rank 0 of 1 and would
        evaluate every document. These are the attributes HFLM sets on GPUs, with the global process index
        (HFLM's local index would repeat across machines).
        """
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        settings = {
            key: normalize_gen_kwargs(requests[ids[0]].args[1], self.max_gen_toks) for key, ids in groups.items()
        }
        if not self.slots or self.think_end_token is not None or any(s.get("do_sample") for s in settings.values()):
            return super().generate_until(requests, disable_tqdm)
        results: list[str] = [""] * len(requests)
        for key, ids in groups.items():
            for i, text in zip(ids, self._generate_group([requests[i].args for i in ids], settings[key]), strict=True):
                results[i] = text
        return results

    def _generate_group(self, args: list[tuple[str, dict]], settings: dict[str, Any]) -> list[str]:
        """One set of generation settings: HFLM's encoding, stop strings, decoding; results cached as they finish."""
        until = handle_stop_sequences(settings.get("until"), eos=self.tok_decode(self.eot_token_id, False))
        max_gen_toks = settings["max_gen_toks"]
        prompts = []
        for context, _ in args:
            ids, mask = self.tok_batch_encode(
                [context], left_truncate_len=self.max_length - max_gen_toks, truncation=self.truncation
            )
            prompts.append(ids[0][mask[0].bool()].tolist())
        texts: list[str] = [""] * len(args)

        def stop(tokens: list[int]) -> bool:
            tail = self.tok_decode(tokens[-STOP_LOOKBACK:], skip_special_tokens=False)
            return any(term and term in tail for term in until)

        def done(index: int, tokens: list[int]) -> None:
            texts[index] = postprocess_generated_text(self.tok_decode(tokens), until, None)
            self.cache_hook.add_partial("generate_until", args[index], texts[index])

        greedy_generate(
            self.model, prompts, max_gen_toks, self._eos_ids(), self.tokenizer.pad_token_id, self.slots, stop, done
        )
        return texts

    def _eos_ids(self) -> set[int]:
        """What HF's `generate` stops at: the generation config's EOS id(s) and the tokenizer's."""
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        return ids | {self.eot_token_id}
