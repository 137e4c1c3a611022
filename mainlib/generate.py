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
- `vllm`: vLLM's engine, when the `vllm` package is installed (not a dependency: it pins its own torch and
  transformers, and cannot be installed beside this project's transformers on the CPU machine it is tested on).
  A stage that generates makes one `VllmEngine` over the base model (`ModelBank.generator`, inside
  `ModelBank.engine_scope`), serves each adapter from its saved folder as a LoRA request, and frees the engine
  when the stage ends; the bank's HF models leave the GPU while it runs. Every request gets its own seed,
  `request_seed(seed, row)`, so duplicate prompts give different samples and a rerun gives the same ones.
- `auto` (default): `vllm` where a stage hands generation a vLLM engine (vLLM installed, CUDA available), else
  `static` on a machine without CUDA and `hf` on one with it. Generation from models being trained (a round of
  MAIN) runs on them, with `static` or `hf`. Why `static` on CPU: the dynamic cache's `torch.cat` copies every
  layer's cache each step and its attention ran 2.5x slower there; on the SmolLM2-135M shape with a LoRA adapter
  (batch 16, 64 + 64 tokens, 2 cores) `static` wrote 1.91x stock `generate`'s tokens/s against `hf`'s 1.64x
  (medians of 3 interleaved runs). GPUs keep `hf` until `python -m bench generate` is run on one.

On CPU, a LoRA model writes from a copy with its active adapter merged into the base's weights (`merge_adapter`,
`merges`): no adapter matmuls per token.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from mainlib import distributed
from mainlib.batching import token_budget_batches
from mainlib.data import Pair
from mainlib.models import bf16_autocast
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
        default="auto",
        metadata={"help": "auto: vllm when installed (and CUDA), else hf on CUDA, static on CPU; see mainlib.generate"},
    )
    merge_adapter: bool | None = field(
        default=None,
        metadata={
            "help": "generate from a copy with the active LoRA adapter merged (merged_for_inference); "
            "None: on CPU, not on GPUs (the copy would not be 4-bit)"
        },
    )


@dataclass
class VllmSettings:
    """The vLLM engine's resources (not its outputs: a stage's fingerprint does not read them). Data parallelism is
    the launch's: `accelerate launch --num_processes N` runs N engines, one per GPU, each on its own shards."""

    gpu_memory_utilization: float = field(
        default=0.85,
        metadata={
            "help": "share of each GPU vLLM may take (the HF models leave it first)",
            "range": "(0, 1]",
        },
    )
    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "GPUs one engine spans (a model too big for one GPU)",
            "range": "[1, inf)",
        },
    )
    max_lora_rank: int = field(default=64, metadata={"help": "the largest LoRA rank served", "range": "[1, inf)"})


Engine = Literal["hf", "static", "vllm"]


def resolve_engine(settings: GenerationSettings) -> Engine:
    """The engine `settings.engine` means on this machine."""
    if settings.engine not in ("auto", "hf", "static", "vllm"):
        raise ValueError(f"engine must be 'auto', 'hf', 'static' or 'vllm', got {settings.engine!r}")
    if settings.engine != "auto":
        return settings.engine
    if not torch.cuda.is_available():
        return "static"
    return "vllm" if vllm_available() else "hf"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: Literal["eos", "length"]
    new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


NUCLEUS_BINS, NUCLEUS_FLOOR = 2048, -40.0  # log p buckets of width 40 / 2048 ≈ 0.02 over [-40, 0]


def nucleus(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which tokens top-p sampling keeps, from a histogram of log p instead of a sort of the whole vocabulary.

    Each row's probability mass is summed per log p bucket; the kept buckets are those from the top down to the
    one where the cumulative mass reaches `top_p`, and that bucket is kept whole. So the set is transformers'
    (the most likely tokens up to the one whose cumulative mass crosses `top_p`) plus the tokens of the crossing
    bucket below it: tokens whose probability is within a factor exp(0.02) = 1.02 of the last one kept.
    """
    bucket = ((logp - NUCLEUS_FLOOR) * (NUCLEUS_BINS / -NUCLEUS_FLOOR)).clamp_(0, NUCLEUS_BINS - 1).long()
    mass = logp.new_zeros(logp.shape[0], NUCLEUS_BINS).scatter_add_(1, bucket, logp.exp())
    from_top = mass.flip(-1).cumsum(-1).flip(-1)  # mass of bucket b and every bucket above it
    crossing = (from_top >= top_p).sum(dim=-1, keepdim=True) - 1  # highest bucket whose cumulative mass >= top_p
    return bucket >= crossing


class NucleusSampler(LogitsProcessor):
    """Temperature and top-p sampling as a logits processor whose output's argmax is the sample, so `generate`
    decodes greedily: log p over the nucleus plus Gumbel noise, -log(-log u), is a draw from the renormalised
    nucleus (the Gumbel-max trick).

    Why: on CPU transformers' top-p sorts the whole vocabulary every step and `multinomial` draws an exponential
    per token; the two took 30% of a decode step of the SmolLM2-135M shape at batch 16 (`python -m bench generate
    --trace`). Here: a histogram (`nucleus`) and one uniform per token. Seeded by the global generator, as stock.
    """

    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            logp = logp.masked_fill(~nucleus(logp, self.top_p), float("-inf"))
        uniform = torch.rand_like(logp).clamp_(min=torch.finfo(logp.dtype).tiny)  # [0, 1) -> (0, 1)
        return logp - torch.log(-torch.log(uniform))


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
    """Complete already-tokenised prompts; results in input order. `model` is a transformers model (engines `hf`,
    `static`) or, under vLLM, the `VllmAdapter` that `ModelBank.generator` hands out."""
    if isinstance(model, VllmAdapter):
        return model.engine.generate_ids(encoded, settings, eos_ids, model.adapter_dir)
    engine = resolve_engine(settings)
    if engine == "vllm" and settings.engine == "vllm":
        raise ValueError(
            "engine='vllm' serves saved adapters from one engine per stage (ModelBank.generator); this model is a "
            "live transformers model (e.g. being trained in a MAIN round): use engine 'hf', 'static' or 'auto'"
        )
    engine = "hf" if engine == "vllm" else engine
    if merges(settings.merge_adapter, model):
        model = merged_for_inference(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(settings.seed)
    results: list[TokenGeneration | None] = [None] * len(encoded)
    sampling = settings.temperature > 0
    extra = {"cache_implementation": "static"} if engine == "static" else {}
    if sampling:  # greedy over NucleusSampler's output is the sample
        extra["logits_processor"] = LogitsProcessorList([NucleusSampler(settings.temperature, settings.top_p)])
    with tqdm(total=len(encoded), desc=desc, unit="prompt") as bar:
        for batch in plan_batches([len(e) for e in encoded], settings):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + list(encoded[i]) for i in batch])
            attention = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch])
            with bf16_autocast(model):
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=settings.max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
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


def merges(setting: bool | None, model) -> bool:
    """Whether `generate_ids` writes from a merged copy: as set, or by default on CPU, where the adapter's matmuls
    cost more than the copy (SmolLM2-135M shape, batch 16, 64 + 64 tokens, 2 cores, static cache: 1.98x stock with
    the copy rebuilt in the call against 1.69x on the adapter, `python -m bench generate`; 2.72-2.76x with a copy
    merged once, ad hoc). Not by default under several processes: loading the copy's base is a collective there
    (`models.load_model` converts on the main process), and MAIN's rounds generate on the main process alone."""
    if setting is not None:
        return setting
    return next(model.parameters()).device.type == "cpu" and distributed.world_size() == 1


def merged_for_inference(model, dtype: torch.dtype | None = None):
    """A plain copy of `model` (a PeftModel, maybe over a 4-bit base) with the adapter merged into
    `dtype` weights (default: the base's compute dtype, e.g. bf16 under a 4-bit or bf16 base): no bitsandbytes
    dequantisation and no LoRA matmuls per decode step, and compilable.

    Over a plain (unquantised) base the copy is built from the live weights (`_merged_from_live`): it shares every
    weight the adapter does not touch and costs only the merged matrices. Over a 4-bit base, or an adapter
    `_merged_from_live` does not handle, the base is reloaded unquantised from where it was loaded
    (`config._name_or_path`); the 4-bit base's rounding is not carried over, so outputs differ from the 4-bit
    model's by that rounding, and the copy costs the memory of the full-precision base (2.5 GiB for a 1B model in
    bf16, 13.5 GiB for 7B).
    """
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from mainlib.models import load_model

    if not isinstance(model, PeftModel) or adapters_disabled(model):
        return model  # nothing to merge (inside `disable_adapter()`: the base)
    dtype = dtype or model.get_base_model().dtype
    if _merges_live(model):
        return _merged_from_live(model, dtype)
    device = next(model.parameters()).device
    base = load_model(model.base_model.model.config._name_or_path, "none", device)
    base.to(dtype)
    name = model.active_adapter
    adapted = get_peft_model(base, model.peft_config[name])
    set_peft_model_state_dict(adapted, get_peft_model_state_dict(model, adapter_name=name))
    return _for_inference(adapted.merge_and_unload(), dtype)


def _merges_live(model) -> bool:
    """Whether `_merged_from_live` can merge `model`'s active adapter: plain LoRA (no DoRA, no modules saved
    whole) on `torch.nn.Linear` base layers, i.e. nothing quantised."""
    from peft.tuners.lora import LoraLayer

    config = model.peft_config[model.active_adapter]
    if getattr(config, "peft_type", None) != "LORA" or config.use_dora or config.modules_to_save:
        return False
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return all(type(m.get_base_layer()) is torch.nn.Linear for m in layers)


def _merged_from_live(model, dtype: torch.dtype):
    """The merged copy without a reload: a fresh module tree (weights left uninitialised) that takes the base's own
    tensors for every weight the adapter leaves alone (shared, not copied: inference never writes them) and
    W + scale * B @ A, summed in fp32, for each adapted matrix. SmolLM2-135M on 2 cores: ~0.1 s against ~1.5 s
    for reload + merge."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    base, name = model.get_base_model(), model.active_adapter
    state = {
        key.replace(".base_layer.", "."): value.to(dtype)
        for key, value in base.state_dict().items()
        if ".lora_" not in key
    }
    with torch.no_grad():
        for path, layer in base.named_modules():
            if isinstance(layer, LoraLayer) and name in layer.lora_A:
                weight = layer.get_base_layer().weight
                state[f"{path}.weight"] = (weight.float() + layer.get_delta_weight(name).float()).to(dtype)
    with no_init_weights():  # a config of its own: the copy turns `use_cache` on, the trained model keeps it off
        merged = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), dtype=dtype)
    merged.load_state_dict(state, strict=True, assign=True)
    merged.tie_weights()
    merged.generation_config = copy.deepcopy(base.generation_config)  # from_config's follows use_cache=False
    return _for_inference(merged.to(next(base.parameters()).device), dtype)


def _for_inference(model, dtype: torch.dtype):
    model.to(dtype)
    model.config.use_cache = model.generation_config.use_cache = True  # training turned the KV cache off
    return model.eval()


def adapters_disabled(model) -> bool:
    """Whether a PeftModel runs as its base now (inside `disable_adapter()`, as `ModelBank.use(None)` runs it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(layer.disable_adapters for layer in model.modules() if isinstance(layer, BaseTunerLayer))


def request_seed(seed: int, row: int) -> int:
    """The sampling seed of prompt `row` of a call seeded `seed`: depends on both alone, so duplicate prompts get
    different samples and a rerun (or a resumed shard) the same ones."""
    digest = hashlib.sha256(f"mainlib-request:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class VllmEngine:
    """One vLLM engine over a base model, serving adapters from their saved folders as LoRA requests.

    Created once per stage (the load and the CUDA graphs cost tens of seconds for a 7B model) and closed after it,
    so its share of the GPU goes back to training.
    """

    def __init__(self, base_model: str, settings: VllmSettings, quantized: bool = False, seed: int = 0) -> None:
        if not vllm_available():
            raise ModuleNotFoundError("engine='vllm' needs the vllm package: pip install vllm (CUDA only)")
        from vllm import LLM

        # under accelerate launch: each process one engine on its own GPU, fed its own shards; vLLM's documented
        # way inside torchrun-launched processes (its examples/offline_inference/torchrun_dp_example.py)
        n = distributed.world_size()
        launched = {"distributed_executor_backend": "external_launcher", "data_parallel_size": n} if n > 1 else {}
        self.llm: Any = LLM(
            model=base_model,
            skip_tokenizer_init=True,  # prompts arrive as token ids, outputs leave as token ids
            enable_lora=True,
            max_lora_rank=settings.max_lora_rank,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            seed=seed,
            **({"quantization": "bitsandbytes"} if quantized else {}),  # QLoRA adapters on the 4-bit base they know
            **launched,
        )
        self._lora_ids: dict[Path, int] = {}  # vLLM caches a LoRA by its integer id: one id per folder

    def _lora(self, adapter_dir: Path | None) -> Any:
        if adapter_dir is None:
            return None
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(adapter_dir, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, str(adapter_dir))

    def generate_ids(
        self,
        encoded: Sequence[Sequence[int]],
        settings: GenerationSettings,
        eos_ids: Sequence[int],
        adapter_dir: Path | None,
    ) -> list[TokenGeneration]:
        """Every prompt at once (vLLM batches them itself), each with its own seed; results in input order."""
        from vllm import SamplingParams

        sampling = settings.temperature > 0
        params = [
            SamplingParams(
                n=1,
                temperature=settings.temperature if sampling else 0.0,
                top_p=settings.top_p if sampling else 1.0,
                max_tokens=settings.max_new_tokens,
                seed=request_seed(settings.seed, row),
                stop_token_ids=list(eos_ids),
            )
            for row in range(len(encoded))
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in encoded]
        outputs = self.llm.generate(prompts, params, lora_request=self._lora(adapter_dir), use_tqdm=True)
        return [_vllm_result(out.outputs[0], eos_ids) for out in outputs]

    def close(self) -> None:
        """Free the engine and its GPU memory (vLLM's own teardown when it has one)."""
        shutdown = getattr(getattr(self.llm, "llm_engine", None), "shutdown", None)
        if callable(shutdown):
            shutdown()
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _vllm_result(completion: Any, eos_ids: Sequence[int]) -> TokenGeneration:
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop":  # a stop token may be kept in token_ids: drop it if so
        return TokenGeneration(ids[:-1] if ids and ids[-1] in eos_ids else ids, "eos")
    return TokenGeneration(ids, "length")


@dataclass(frozen=True)
class VllmAdapter:
    """What `generate` takes in place of a model under vLLM: the stage's engine and the adapter's folder (None: the
    base model)."""

    engine: VllmEngine
    adapter_dir: Path | None


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
