"""Batched generation: one engine for every stage that writes text (examples, synthesis, EM rounds, MuSC).

Prompts are sorted by length and left-padded, and batches are sized by a token budget
(rows x (longest prompt + max_new_tokens) <= token_budget), so short prompts share big batches and long
ones don't run out of memory. Outputs come back in the input order, each with its finish reason:
`eos` (the model stopped) or `length` (it hit max_new_tokens). Same seed, same outputs.

Engines (`GenerationSettings.engine`):
- `hf`: transformers' `generate` with its dynamic KV cache; works everywhere.
- `static`: the same with a static (pre-allocated) KV cache. On CUDA, for a model that is not 4-bit
  (see `merged_for_inference`), transformers then compiles the decode step with CUDA graphs, which removes
  the per-step launch overhead that bounds small-model decoding. The first batch of each shape pays the
  compile; `python -m bench generate` measures whether it pays.
- `vllm`: vLLM's engine, when the `vllm` package is installed (it is not a dependency, and cannot be
  installed on the offline GPU machine this project is benchmarked on). The model is merged, written to a
  temporary directory and loaded by vLLM.
- `auto` (default): `vllm` when it is importable and CUDA is available, else `hf`.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from mainlib.batching import token_budget_batches
from mainlib.data import Pair
from mainlib.prompts import Direction, build_prompt


@dataclass
class GenerationSettings:
    """Sampling settings. temperature 0 means greedy decoding."""

    max_new_tokens: int = field(default=256, metadata={"help": "tokens to write at most", "range": "[1, inf)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature; 0 = greedy", "range": "[0, inf)"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass", "range": "(0, 1]"})
    token_budget: int = field(
        default=16384, metadata={"help": "rows x (prompt + new tokens) per batch", "range": "[1, inf)"}
    )
    max_batch_size: int = field(default=64, metadata={"help": "rows per batch at most", "range": "[1, inf)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    engine: Literal["auto", "hf", "static", "vllm"] = field(
        default="auto", metadata={"help": "auto: vllm when installed (and CUDA), else hf; see the module docstring"}
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "generate from a merged full-precision copy of a LoRA model (see merged_for_inference)"},
    )


Engine = Literal["hf", "static", "vllm"]


def resolve_engine(settings: GenerationSettings) -> Engine:
    """The engine `settings.engine` means on this machine."""
    if settings.engine not in ("auto", "hf", "static", "vllm"):
        raise ValueError(f"engine must be 'auto', 'hf', 'static' or 'vllm', got {settings.engine!r}")
    if settings.engine != "auto":
        return settings.engine
    return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: Literal["eos", "length"]
    new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_batches(lengths: Sequence[int], settings: GenerationSettings) -> list[list[int]]:
    """Indices grouped into batches, shortest prompts first, each within the token budget."""
    return token_budget_batches(lengths, settings.token_budget, settings.max_batch_size, settings.max_new_tokens)


@dataclass(frozen=True)
class TokenGeneration:
    """What one prompt got: the new token ids (EOS excluded) and why it stopped."""

    token_ids: list[int]
    finish_reason: Literal["eos", "length"]

    @property
    def new_tokens(self) -> int:
        """Tokens the model wrote, the EOS it stopped on included."""
        return len(self.token_ids) + (self.finish_reason == "eos")


def _finish(new: list[int], eos_ids: Sequence[int]) -> TokenGeneration:
    stop = next((k for k, t in enumerate(new) if t in eos_ids), None)
    return TokenGeneration(new, "length") if stop is None else TokenGeneration(new[:stop], "eos")


@torch.no_grad()
def generate_ids(
    model,
    encoded: Sequence[Sequence[int]],
    settings: GenerationSettings,
    eos_ids: Sequence[int],
    pad_id: int,
    desc: str = "generating",
) -> list[TokenGeneration]:
    """Complete already-tokenised prompts with the `hf` or `static` engine; results in input order."""
    engine = resolve_engine(settings)
    if engine == "vllm":
        return vllm_generate_ids(model, encoded, settings, eos_ids)
    if settings.merge_adapter:
        model = merged_for_inference(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(settings.seed)
    results: list[TokenGeneration | None] = [None] * len(encoded)
    sampling = settings.temperature > 0
    extra = {"cache_implementation": "static"} if engine == "static" else {}
    with tqdm(total=len(encoded), desc=desc, unit="prompt") as bar:
        for batch in plan_batches([len(e) for e in encoded], settings):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + list(encoded[i]) for i in batch])
            attention = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch])
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=settings.max_new_tokens,
                do_sample=sampling,
                temperature=settings.temperature if sampling else None,
                top_p=settings.top_p if sampling else None,
                top_k=None,
                eos_token_id=list(eos_ids),
                pad_token_id=pad_id,
                use_cache=True,
                **extra,
            )
            for row, i in enumerate(batch):
                results[i] = _finish(out[row, width:].tolist(), eos_ids)
            bar.update(len(batch))
    model.train(was_training)
    return [r for r in results if r is not None]


def eos_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, list) else [eos]


def generate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings,
    desc: str = "generating",
) -> list[Generation]:
    """Complete every prompt (already formatted, e.g. by `prompts.build_prompt`); results in input order."""
    if not prompts:
        return []
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outputs = generate_ids(model, encoded, settings, eos_token_ids(tokenizer), tokenizer.pad_token_id, desc)
    return [
        Generation(tokenizer.decode(o.token_ids, skip_special_tokens=True).strip(), o.finish_reason, o.new_tokens)
        for o in outputs
    ]


# --------------------------------------------------------------------------------------------------
# Fast inference copies and the optional vLLM engine
# --------------------------------------------------------------------------------------------------


def merged_for_inference(model, dtype: torch.dtype | None = None):
    """A plain copy of `model` (a PeftModel, maybe over a 4-bit base) with the adapter merged into
    `dtype` weights: no bitsandbytes dequantisation and no LoRA matmuls per decode step, and compilable.

    The base is reloaded unquantised from where it was loaded (`config._name_or_path`); the 4-bit base's
    rounding is not carried over, so outputs differ from the 4-bit model's by that rounding. Costs the
    memory of the full-precision base (2.5 GiB for a 1B model in bf16, 13.5 GiB for 7B).
    """
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from mainlib.models import compute_dtype, load_model

    if not isinstance(model, PeftModel):
        return model
    device = next(model.parameters()).device
    base = load_model(model.base_model.model.config._name_or_path, "none", device)
    if dtype is not None:
        base.to(dtype)
    name = model.active_adapter
    config = model.peft_config[name]
    copy = get_peft_model(base, config)
    set_peft_model_state_dict(copy, get_peft_model_state_dict(model, adapter_name=name))
    merged = copy.merge_and_unload()
    merged.to(dtype or compute_dtype(device))
    merged.config.use_cache = True
    return merged.eval()


def vllm_generate_ids(
    model, encoded: Sequence[Sequence[int]], settings: GenerationSettings, eos_ids: Sequence[int]
) -> list[TokenGeneration]:
    """Generate with vLLM: the (merged) model is saved to a temporary directory and served from there.

    Every prompt is submitted at once; vLLM schedules them itself (continuous batching, paged KV cache).
    """
    if not vllm_available():
        raise ModuleNotFoundError("engine='vllm' needs the vllm package: pip install vllm (CUDA only)")
    from vllm import LLM, SamplingParams

    merged = merged_for_inference(model)
    sampling = settings.temperature > 0
    params = SamplingParams(
        n=1,
        temperature=settings.temperature if sampling else 0.0,
        top_p=settings.top_p if sampling else 1.0,
        max_tokens=settings.max_new_tokens,
        seed=settings.seed,
        stop_token_ids=list(eos_ids),
    )
    with tempfile.TemporaryDirectory(prefix="mainlib-vllm-") as folder:
        merged.save_pretrained(folder, safe_serialization=True)
        llm = LLM(model=folder, tokenizer=None, skip_tokenizer_init=True, seed=settings.seed)
        prompts = [{"prompt_token_ids": list(ids)} for ids in encoded]
        outputs = llm.generate(prompts, params, use_tqdm=True)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop":  # a stop token may be kept in token_ids: drop it if so
            results.append(TokenGeneration(ids[:-1] if ids and ids[-1] in eos_ids else ids, "eos"))
        else:
            results.append(TokenGeneration(ids, "length"))
    return results


def complete_pairs(
    model,
    tokenizer: PreTrainedTokenizerBase,
    direction: Direction,
    pairs: Sequence[Pair],
    settings: GenerationSettings,
    system: str | None = None,
) -> list[Generation]:
    """Forward: write a response for each pair's instruction. Reverse: write an instruction for its response."""
    prompts = [build_prompt(tokenizer, direction, p.instruction, p.response, system) for p in pairs]
    return generate(model, tokenizer, prompts, settings, desc=f"{direction} generation")
