"""One loaded base model, many named LoRA adapters (forward, reverse, seed-only reverse, policy).

Why: each adapter used to load its own copy of the base, so MAIN held two or three copies of the same weights
(the Humpback score stage three), and a reloaded adapter skipped the k-bit preparation a fresh one got, so
4-bit training numerics differed between the two. A `ModelBank` loads the base once, lazily, prepares it once
through `models.prepare_for_lora` (the one preparation every adapter shares, fresh or reloaded) and wraps it
in one peft `PeftModel` that holds every adapter by name:

    bank = ModelBank("smollm2-135m-instruct")
    bank.add("forward", LoraSettings(), seed=0)
    bank.load("reverse", "runs/demo/init_sft/reverse")
    with bank.train("forward") as model:  # only forward's LoRA weights require grad
        sft.train_sft(model, tokenizer, pairs, settings, out)
    with bank.use("reverse") as model:  # generation and scoring take a model: they take this one
        ...
    with bank.use(None) as model:  # the plain base, adapters disabled
        ...
    bank.save("forward", out_dir, tokenizer, {"round": 0})  # the layout `models.save_adapter` writes

Outside `train(name)` no parameter requires grad: peft's `set_adapter` makes whichever adapter it activates
trainable, so every context here puts the gradient flags, the active adapter and train/eval mode back.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mainlib import distributed, models
from mainlib.generate import GenerationSettings, VllmAdapter, VllmEngine, VllmSettings, resolve_engine
from mainlib.models import LoraSettings, Quantization


def same_model(a: str, b: str) -> bool:
    """Whether two `load_model` names mean the same model (a folder may be written relative or absolute)."""
    if a == b:
        return True
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    return path_a.is_dir() and path_b.is_dir() and path_a.resolve() == path_b.resolve()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's RNG seeded with `seed` (CPU and the current GPU), and leave the global RNG as it was."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def free_memory() -> None:
    """Give memory freed by dropped tensors back (Python's cycles, then the CUDA cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelBank:
    """One base model loaded once, with named LoRA adapters that are used, trained and saved one at a time."""

    def __init__(
        self,
        model: str,
        quantization: Quantization = "auto",
        gradient_checkpointing: bool | None = False,
        *,
        trust_remote_code: bool = False,
        vllm: VllmSettings | None = None,
    ) -> None:
        models.check_model_name(model)  # a typo fails here, not when the first adapter loads the base
        self.base_model = model
        self.vllm = vllm or VllmSettings()
        self._engine: VllmEngine | None = None  # a stage's vLLM engine, while the stage runs (`engine_scope`)
        self.quantization: Quantization = quantization
        self.gradient_checkpointing = models.use_checkpointing(gradient_checkpointing)
        self.trust_remote_code = trust_remote_code
        self._base: PreTrainedModel | None = None
        self._peft: PeftModel | None = None
        self._adapters: dict[str, str] = {}  # name -> the adapter's name inside peft (`peft_name`)
        self._frozen: set[str] = set()  # adapters loaded for inference only (and copies): never trained
        self._sources: dict[str, Path] = {}  # name -> the folder its weights equal (loaded from or saved to)

    # ----------------------------------------------------------------------------------------------
    # What the bank holds
    # ----------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The adapters in the bank, in the order they were added."""
        return list(self._adapters)

    @staticmethod
    def peft_name(name: str) -> str:
        """The adapter's name inside peft (its parameter names, `peft_config`): `name`, or `name + "_adapter"` when
        `name` is an attribute of torch modules (`forward`, `train`, ...), which peft's ModuleDicts refuse as keys,
        or a part of peft's "lora_" prefix."""
        refused = hasattr(torch.nn.ModuleDict(), name) or name in "lora_"  # peft: a part of its prefix may reload wrong
        return f"{name}_adapter" if refused else name

    @property
    def model(self) -> torch.nn.Module:
        """The shared module: the PeftModel holding the adapters (the prepared base before the first one).

        Prefer `use` and `train`: they set the active adapter and the gradients, and put them back.
        """
        return self._peft if self._peft is not None else self._prepared_base()

    def _prepared_base(self) -> PreTrainedModel:
        """The base, loaded and prepared on first use: the one preparation all adapters share."""
        if self._base is None:
            base = models.load_model(self.base_model, self.quantization, trust_remote_code=self.trust_remote_code)
            base = models.prepare_for_lora(base, self.gradient_checkpointing)
            base.requires_grad_(False)  # only an adapter inside `train` ever requires grad
            self._base = base
        return self._base

    def _check(self, name: str) -> tuple[PeftModel, str]:
        """The PeftModel and the peft name of adapter `name`; an unknown name is an error that lists the known."""
        if self._peft is None or name not in self._adapters:
            known = ", ".join(repr(n) for n in self.names) or "none yet"
            raise ValueError(f"no adapter {name!r} in the bank of {self.base_model!r}; its adapters: {known}")
        return self._peft, self._adapters[name]

    def _check_new(self, name: str) -> str:
        """The peft name for a new adapter `name`, after checking that it is free."""
        if not name or "." in name:  # peft keys parameters by "<module>.<adapter>.weight"
            raise ValueError(f"adapter name {name!r}: use a non-empty name without dots")
        peft_name = self.peft_name(name)
        if name in self._adapters or (self._peft is not None and peft_name in self._peft.peft_config):
            raise ValueError(f"adapter {name!r} is already in the bank; drop it first to replace it")
        return peft_name

    # ----------------------------------------------------------------------------------------------
    # Adding, saving and dropping adapters
    # ----------------------------------------------------------------------------------------------

    def add(self, name: str, lora: LoraSettings, seed: int) -> None:
        """A fresh adapter `name`; its LoRA initialisation is drawn from `seed` alone, so it is reproducible."""
        peft_name = self._check_new(name)
        config = models.lora_config(lora)
        with seeded(seed), self._keeping_grads():
            if self._peft is None:
                self._peft = get_peft_model(self._prepared_base(), config, adapter_name=peft_name)
            else:
                self._peft.add_adapter(peft_name, config)
        self._adapters[name] = peft_name

    def load(self, name: str, adapter_dir: str | Path, trainable: bool = False) -> dict[str, Any]:
        """Add the adapter mainlib saved in `adapter_dir` as `name`; returns the mainlib config saved with it.

        `trainable=False` loads it for inference (peft's `is_trainable`); `train(name)` then refuses it.
        """
        config = models.read_adapter_config(adapter_dir)  # "no such folder" / "not saved by mainlib"
        saved_base = str(config.get("base_model"))
        if not same_model(saved_base, self.base_model):
            raise ValueError(
                f"adapter {adapter_dir} was trained on base model {saved_base!r}, "
                f"but this bank holds {self.base_model!r}"
            )
        peft_name = self._check_new(name)
        with self._keeping_grads():
            if self._peft is None:
                base = self._prepared_base()
                self._peft = PeftModel.from_pretrained(
                    base, str(adapter_dir), adapter_name=peft_name, is_trainable=trainable
                )
            else:
                self._peft.load_adapter(str(adapter_dir), adapter_name=peft_name, is_trainable=trainable)
        self._adapters[name] = peft_name
        self._sources[name] = Path(adapter_dir).resolve()
        if not trainable:
            self._frozen.add(name)
        return config

    def ensure(self, name: str, adapter_dir: str | Path, trainable: bool = False) -> str:
        """Adapter `name` as saved in `adapter_dir`: kept when the bank already holds exactly those weights (loaded
        from or saved to that folder, trainable if asked), else (re)loaded. Returns `name`.

        Stages call this instead of `load`, so consecutive stages reuse an adapter the previous one left in memory."""
        wanted = Path(adapter_dir).resolve()
        if name in self._adapters:
            if self._sources.get(name) == wanted and (name not in self._frozen or not trainable):
                return name
            self.drop(name)
        self.load(name, adapter_dir, trainable)
        return name

    def copy(self, source: str, name: str) -> None:
        """A frozen copy of adapter `source` named `name` (e.g. a DPO reference): same shape, weights and dtype.

        The dtype too: TRL casts a QLoRA adapter it trains to bf16, and the LoRA product is computed in the
        adapter's dtype, so an fp32 copy of bf16 weights would not give the same outputs.
        """
        peft_model, source_name = self._check(source)
        peft_name = self._check_new(name)
        with self._keeping_grads():
            peft_model.add_adapter(peft_name, copy.deepcopy(peft_model.peft_config[source_name]))
            self._adapters[name] = peft_name
            target = self.weights(name)
            for key, param in self.weights(source).items():
                target[key].data = param.detach().clone()
        self._frozen.add(name)

    def weights(self, name: str) -> dict[str, torch.nn.Parameter]:
        """Adapter `name`'s LoRA parameters, keyed by their names without the adapter's (comparable across adapters)."""
        peft_model, peft_name = self._check(name)
        found = {}
        for key, param in peft_model.named_parameters():
            parts = key.split(".")  # "...q_proj.lora_A.<adapter>.weight": the adapter follows a lora_* module
            for i in range(1, len(parts)):
                if parts[i] == peft_name and parts[i - 1].startswith("lora_"):
                    found[".".join(parts[:i] + parts[i + 1 :])] = param
        return found

    def save(self, name: str, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase, config: dict[str, Any]) -> Path:
        """Save only adapter `name` into `out_dir`, as `models.save_adapter` lays it out (so `models.load_adapter`
        and `mainlib.evaluate` read it); `config` is stored with the bank's base model and quantization."""
        peft_model, peft_name = self._check(name)
        if "base_model" in config and not same_model(str(config["base_model"]), self.base_model):
            raise ValueError(f"config says base model {config['base_model']!r}; this bank holds {self.base_model!r}")
        saved = {"base_model": self.base_model, "quantization": self.quantization, **config}
        # every process of a launch holds the same weights (DDP): the main one writes them
        path = distributed.on_main(lambda: models.save_adapter(peft_model, tokenizer, out_dir, saved, peft_name))
        self._sources[name] = Path(out_dir).resolve()  # what is in memory is what that folder holds now
        return path

    def drop(self, name: str) -> None:
        """Delete adapter `name` and free its memory; when the last one goes, the plain prepared base stays."""
        peft_model, peft_name = self._check(name)
        with self._keeping_grads():
            others = [n for n in peft_model.peft_config if n != peft_name]
            if peft_model.active_adapter == peft_name and others:  # else peft warns that it picks one
                peft_model.set_adapter(others[0], inference_mode=True)
            peft_model.delete_adapter(peft_name)
        del self._adapters[name]
        self._frozen.discard(name)
        self._sources.pop(name, None)
        if not peft_model.peft_config:  # peft cannot add to a PeftModel with no adapter: unwrap the base
            self._base, self._peft = peft_model.unload(), None
        free_memory()

    # ----------------------------------------------------------------------------------------------
    # Running and training one adapter
    # ----------------------------------------------------------------------------------------------

    @contextmanager
    def use(self, name: str | None) -> Iterator[torch.nn.Module]:
        """The shared model in eval mode with adapter `name` active (`None`: the plain base, adapters disabled).

        Generation and scoring take a model, so they take this one. Nothing requires grad inside.
        """
        peft_name = self._check(name)[1] if name is not None else None
        model = self.model
        with self._restoring():
            model.eval()
            if peft_name is None:
                with model.disable_adapter() if self._peft is not None else nullcontext():
                    yield model
            else:
                model.set_adapter(peft_name, inference_mode=True)
                yield model

    # ----------------------------------------------------------------------------------------------
    # Generation with vLLM
    # ----------------------------------------------------------------------------------------------

    @contextmanager
    def generator(self, name: str | None, settings: GenerationSettings) -> Iterator[Any]:
        """What `generate` takes to write with adapter `name` (None: the base): `use(name)`'s model, or under vLLM
        (`resolve_engine`) the stage's engine serving `name`'s saved folder as a LoRA request."""
        if resolve_engine(settings) != "vllm":
            with self.use(name) as model:
                yield model
            return
        adapter_dir = None if name is None else self._sources.get(name)  # kept by `release`
        if name is not None and adapter_dir is None:
            raise ValueError(f"vLLM serves adapters from their saved folders; adapter {name!r} has none (save it)")
        yield VllmAdapter(self._vllm_engine(), adapter_dir)

    def _vllm_engine(self) -> VllmEngine:
        """The stage's engine, made at its first use; the HF models leave the GPU first (`release`)."""
        if self._engine is None:
            self.release()
            quantized = models.quantization_config(self.quantization, models.default_device()) is not None
            self._engine = VllmEngine(models.resolve_model(self.base_model), self.vllm, quantized)
        return self._engine

    @contextmanager
    def engine_scope(self) -> Iterator[None]:
        """A stage's generation: one vLLM engine at most, made when first needed and closed when the block ends."""
        try:
            yield
        finally:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def release(self) -> None:
        """Free the base and every adapter; `ensure` reloads what a later stage needs from its folder (and vLLM
        serves them from there: their folders are kept). Adapters whose weights are in no folder (trained, not
        saved) would be lost: that is an error."""
        unsaved = [name for name in self._adapters if name not in self._sources]
        if unsaved:
            raise ValueError(f"adapters {unsaved} are not saved; save them before the bank releases its models")
        self._base, self._peft = None, None
        self._adapters.clear()
        self._frozen.clear()
        free_memory()

    @contextmanager
    def train(self, name: str) -> Iterator[PeftModel]:
        """The shared model with adapter `name` active and only its LoRA weights requiring grad: a trainer given
        this model optimises `name` alone; every other adapter and the base stay frozen. Restored afterwards,
        with the dropout rates a trainer may change on the shared model."""
        peft_model, peft_name = self._check(name)
        if name in self._frozen:
            raise ValueError(f"adapter {name!r} was loaded for inference; load it with trainable=True to train it")
        dropouts = {m: m.p for m in peft_model.modules() if isinstance(m, torch.nn.Dropout)}
        self._sources.pop(name, None)  # its weights are about to change: no folder holds them until `save`
        with self._restoring():
            peft_model.set_adapter(peft_name)
            peft_model.requires_grad_(False)
            peft_model.set_requires_grad(peft_name, True)
            try:
                yield peft_model
            finally:  # TRL's DPOTrainer sets every dropout of the model it gets to 0 (`disable_dropout`)
                for module, p in dropouts.items():
                    module.p = p

    @contextmanager
    def _restoring(self) -> Iterator[None]:
        """Put back the active adapter, train/eval mode and every requires_grad flag when the block ends."""
        model = self.model
        was_training = model.training
        active = self._peft.active_adapter if self._peft is not None else None
        with self._keeping_grads():
            try:
                yield
            finally:
                if self._peft is not None and active in self._peft.peft_config:
                    self._peft.set_adapter(active, inference_mode=True)  # flags: put back by _keeping_grads
                model.train(was_training)

    @contextmanager
    def _keeping_grads(self) -> Iterator[None]:
        """Put back every parameter's requires_grad flag; parameters created inside (a new adapter) stay frozen."""
        before = {p: p.requires_grad for p in self.model.parameters()}  # keyed by the tensor itself, not its id
        try:
            yield
        finally:
            for p in self.model.parameters():
                p.requires_grad_(before.get(p, False))


@dataclass
class Shared:
    """What a pipeline's stages share (`StageContext.shared`): the tokenizer and one bank of named adapters."""

    tokenizer: PreTrainedTokenizerBase
    bank: ModelBank
