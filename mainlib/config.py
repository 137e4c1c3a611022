"""The configurations of MAIN and MuSC, defined once: recipes, flat parameters, and validation before work.

    config = build(MainConfig, "quickstart", n_seed=16)   # a bundled recipe (or a YAML path), then overrides
    validate(config)                                      # everything checkable without a model, all at once

- The dataclasses below (and the settings they nest) are the one source of truth: each field has its
  default (the spec's, docs/ALGORITHMS.md), a `help` line and its rules in the metadata
  (see `mainlib.parameters`). Flat names (`learning_rate`, `round_epochs`, `filter_method`) are derived
  from them; `python -m mainlib.config main|musc` lists them.
- A recipe (`recipes/<name>.yaml`, bundled in `mainlib/recipes/`) holds a full setup as nested keys that
  mirror the dataclasses, one section per pipeline (`main:`, `musc:`). Flat parameters (a notebook's
  parameters cell, `papermill -p`) override it; each override is recorded (`Provenance`), never silent.
- `validate` runs before any model loads: types, ranges, choices, exclusive options, the rules between
  fields, the model key or path, and that every data file exists and parses (the first bad line named).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from mainlib import data, distributed
from mainlib.generate import GenerationSettings, VllmSettings
from mainlib.models import LoraSettings, Quantization, check_model_available
from mainlib.musc.coarse import CoarseSettings
from mainlib.musc.tdpo import DPOSettings
from mainlib.musc.tokens import TokenWeightSettings
from mainlib.mutual import MainSettings
from mainlib.parameters import (
    ConfigError,
    Path_,
    Problem,
    close_matches,
    describe,
    field_types,
    fits,
    flat_parameters,
    get_path,
    is_settings,
    parameters_of,
    problems,
    set_path,
    share,
    shared_fields,
    type_allowed,
    unknown_names,
)
from mainlib.scoring import ScoringSettings
from mainlib.sft import SFTHyperparameters
from mainlib.yamlfile import load_yaml

__all__ = [
    "ConfigError",
    "MainConfig",
    "MuscConfig",
    "Provenance",
    "Recipe",
    "build",
    "describe",
    "flat_parameters",
    "from_notebook",
    "load_recipe",
    "validate",
]

log = logging.getLogger(__name__)
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
SELF_INSTRUCT = "self"  # MuscConfig.instructions: the policy writes the instructions


def reference_sft() -> SFTHyperparameters:
    """The spec's SFT numbers: lr 1e-5, (effective) batch 32 (ALGORITHMS.md §3, Humpback, which MAIN is
    compared against; the spec gives no other). 8 x 4 accumulation keeps the micro-batch memory of 8."""
    return SFTHyperparameters(learning_rate=1e-5, batch_size=8, grad_accum=4)


def shard_size_field() -> Any:
    """The `shard_size` option both pipelines have: rows per shard of their data stages (`mainlib.shards`)."""
    return field(
        default=256,
        metadata={
            "help": "rows per shard of the data stages (each written atomically; a killed stage resumes at the "
            "first missing shard)",
            "range": "[1, inf)",
        },
    )


def vllm_field() -> Any:
    return field(
        default_factory=VllmSettings,
        metadata={"help": "the vLLM engine's GPU share and size, when generation runs on vLLM", "prefix": "vllm_"},
    )


@dataclass
class MainConfig:
    """Everything one MAIN run depends on (ALGORITHMS.md §1, §3). Notebooks 01-03 build it."""

    recipe_section: ClassVar[str] = "main"

    run_name: str = field(default="main", metadata={"help": "runs/<run_name>/ holds the stages (one model and data)"})
    runs_dir: str = field(default="runs", metadata={"help": "folder of all runs"})
    model: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "bundled key, local model folder, or hub id (owner/name)", "source": "model"},
    )
    quantization: Quantization = field(
        default="auto",
        metadata={
            "help": "auto: 4-bit NF4 (QLoRA) on CUDA, bf16 base weights on a CPU with bf16 matmuls (AMX/AVX512-BF16), "
            "else none (full precision); or 4bit / bf16 / none. LoRA weights are fp32 in every case"
        },
    )
    seed_data: str = field(
        default="bundled:seed",
        metadata={
            "help": "seed pairs: bundled:<split>, a .jsonl/.json/.csv file, or hf:<id>[@split]",
            "source": "pairs",
        },
    )
    pool_data: str = field(
        default="bundled:unlabeled",
        metadata={"help": "unlabeled responses: bundled:unlabeled, or a file of {response} records", "source": "pool"},
    )
    n_seed: int | None = field(
        default=None, metadata={"help": "seed pairs sampled with `seed`; None: all", "range": "[1, inf)"}
    )
    n_pool: int | None = field(
        default=None, metadata={"help": "pool responses sampled with `seed`; None: all", "range": "[1, inf)"}
    )
    max_length: int = field(
        default=2048,
        metadata={
            "help": "prompt + target tokens of every SFT; longer pairs are dropped when cleaning (the spec's cutoff)",
            "range": "[1, inf)",
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "data sampling, every SFT (init, final: seed; round k: seed + k + 1) and the random filter"},
    )
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "every adapter of the run"})
    sft: SFTHyperparameters = field(
        default_factory=reference_sft, metadata={"help": "init_sft: forward and reverse on the seed", "prefix": ""}
    )
    round_sft: SFTHyperparameters = field(
        default_factory=reference_sft, metadata={"help": "the α-weighted SFT of each round", "prefix": "round_"}
    )
    final_sft: SFTHyperparameters = field(
        default_factory=reference_sft, metadata={"help": "the final SFT on seed ∪ selected", "prefix": "final_"}
    )
    main: MainSettings = field(default_factory=MainSettings, metadata={"help": "MAIN's own choices", "prefix": ""})
    round_generation: GenerationSettings = field(
        default_factory=GenerationSettings,
        metadata={"help": "round k: p_r writes x̂ for seed responses, p_f writes ŷ", "prefix": "round_"},
    )
    synthesis: GenerationSettings = field(
        default_factory=GenerationSettings, metadata={"help": "p_r^K writes x̂ for the pool (T 0.7, top-p 0.9)"}
    )
    rating: GenerationSettings = field(
        default_factory=lambda: GenerationSettings(max_new_tokens=12, temperature=0.0),
        metadata={"help": "Humpback's 5-point rating by the seed model (greedy)"},
    )
    scoring: ScoringSettings = field(default_factory=ScoringSettings, metadata={"help": "batching of s_f and s_r"})
    shard_size: int = shard_size_field()
    vllm: VllmSettings = vllm_field()  # noqa: RUF009 (it returns a dataclasses.field)

    def identity(self) -> dict[str, Any]:
        """What a run directory is tied to: another model or data needs another run_name."""
        return {"model": self.model, "seed_data": self.seed_data, "pool_data": self.pool_data}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MuscConfig:
    """Everything one MuSC run depends on (ALGORITHMS.md §2). Notebook 04 builds it."""

    recipe_section: ClassVar[str] = "musc"

    run_name: str = field(default="musc", metadata={"help": "runs/<run_name>/musc/ holds the stages"})
    runs_dir: str = field(default="runs", metadata={"help": "folder of all runs"})
    model: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "bundled key, local model folder, or hub id (owner/name)", "source": "model"},
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "a mainlib adapter folder to start from (e.g. MAIN's); None: the base", "source": "adapter"},
    )
    quantization: Quantization = field(
        default="auto",
        metadata={
            "help": "auto: 4-bit NF4 (QLoRA) on CUDA, bf16 base weights on a CPU with bf16 matmuls (AMX/AVX512-BF16), "
            "else none (full precision); or 4bit / bf16 / none. LoRA weights are fp32 in every case"
        },
    )
    instructions: str = field(
        default="bundled:complex_instructions",
        metadata={"help": "a complex-instruction pool (bundled or .jsonl), or 'self'", "source": "instructions"},
    )
    n: int | None = field(
        default=None,
        metadata={
            "help": "instructions used, sampled with `seed` (None: all); with 'self': written (None: 24)",
            "range": "[1, inf)",
        },
    )
    self_instruct_constraints: int = field(
        default=5, metadata={"help": "'self': a task with more than N constraints", "range": "[1, inf)"}
    )
    seed: int = field(default=0, metadata={"help": "the run's one seed: sampling, corruption, generation, DPO"})
    heldout_fraction: float = field(
        default=0.0,
        metadata={
            "help": "share of the preference pairs tdpo leaves out, to measure held-out preference accuracy on "
            "(tdpo/heldout.json, mainlib.musc.heldout); 0: train on all",
            "range": "[0, 1)",
        },
    )
    shard_size: int = shard_size_field()
    coarse: CoarseSettings = field(
        default_factory=CoarseSettings,
        metadata={
            "help": "decompose, corrupt, recombine, respond",
            "prefix": "",
            "shared": {"seed": "seed", "helper.seed": "seed", "respond.seed": "seed", "self_instruct.seed": "seed"},
        },
    )
    weights: TokenWeightSettings = field(
        default_factory=TokenWeightSettings, metadata={"help": "token weights", "prefix": ""}
    )
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "the policy's adapter"})
    dpo: DPOSettings = field(
        default_factory=DPOSettings,
        metadata={"help": "token-weighted DPO", "prefix": "", "shared": {"seed": "seed"}},
    )
    vllm: VllmSettings = vllm_field()  # noqa: RUF009 (it returns a dataclasses.field)

    def __post_init__(self) -> None:
        share(self)  # the nested seeds follow `seed` (see `shared`)

    def identity(self) -> dict[str, Any]:
        return {"model": self.model, "adapter": self.adapter, "instructions": self.instructions}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CONFIGS: dict[str, type] = {"main": MainConfig, "musc": MuscConfig}
T = TypeVar("T")
for _cls in CONFIGS.values():  # a flat-name collision fails here, at import, not in a notebook
    parameters_of(_cls)


# ---- recipes --------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """The values a recipe sets (attribute path -> value) and where they came from."""

    source: str | None
    values: dict[Path_, Any] = field(default_factory=dict)


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(recipe: str | Path) -> Path:
    """A bundled recipe by name ("quickstart", "paper"), or a YAML file."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        if path.is_file():
            return path
        allowed = f"an existing YAML file (no such file), or a bundled recipe: {', '.join(bundled_recipes())}"
    elif (RECIPES_DIR / f"{recipe}.yaml").is_file():
        return RECIPES_DIR / f"{recipe}.yaml"
    else:
        hint = close_matches(str(recipe), bundled_recipes())
        allowed = f"a bundled recipe ({', '.join(bundled_recipes())}) or a YAML path{'; ' + hint if hint else ''}"
    raise ConfigError([Problem("recipe", "", str(recipe), allowed)])


def load_recipe(cls: type, recipe: str | Path | Mapping[str, Any]) -> Recipe:
    """The values a recipe sets for `cls`: its `cls.recipe_section` section (a mapping is taken as that
    section's content), every key and type checked."""
    if isinstance(recipe, Mapping):
        source, raw = "<mapping>", {cls.recipe_section: dict(recipe)}
    else:
        path = recipe_path(recipe)
        source, raw = str(path), load_yaml(path) or {}
    found: list[Problem] = []
    if not isinstance(raw, dict):
        raise ConfigError([Problem("recipe", "", raw, f"sections {', '.join(CONFIGS)}")], where=source)
    found += [
        Problem(str(k), "", "...", f"a section: {', '.join(CONFIGS)}; {close_matches(str(k), list(CONFIGS))}")
        for k in raw
        if k not in CONFIGS
    ]
    if cls.recipe_section not in raw:
        allowed = f"a `{cls.recipe_section}:` section (write `{cls.recipe_section}: {{}}` for the defaults)"
        found.append(Problem(cls.recipe_section, "", None, allowed))
    values: dict[Path_, Any] = {}
    _read_section(cls, cls, raw.get(cls.recipe_section) or {}, (), values, found)
    if found:
        raise ConfigError(found, where=source)
    return Recipe(source, values)


def _read_section(root: type, cls: type, mapping: Any, path: Path_, values: dict, found: list[Problem]) -> None:
    """Walk one recipe mapping along the dataclass `cls`, collecting leaf values and key/type problems."""
    here_name = ".".join((root.recipe_section, *path))
    if not isinstance(mapping, Mapping):
        found.append(Problem(here_name, "", mapping, f"a mapping of {cls.__name__} fields"))
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    for key, value in mapping.items():
        here, key_name = (*path, str(key)), f"{here_name}.{key}"
        if key not in fields:
            found.append(Problem(key_name, "", value, _unknown_key(root, cls, str(key))))
        elif here in shared_fields(root):
            leader = ".".join(shared_fields(root)[here])
            found.append(Problem(key_name, "", value, f"no key: it follows {leader}; set that one"))
        elif is_settings(hints[key]):
            _read_section(root, hints[key], value, here, values, found)
        elif not fits(value, hints[key]):
            found.append(Problem(key_name, "", value, type_allowed(value, hints[key])))
        else:
            values[here] = value


def _unknown_key(root: type, cls: type, key: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    text = f"a field of {cls.__name__}: {', '.join(names)}"
    if hint := close_matches(key, names):
        text += f"; {hint}"
    table = flat_parameters(root)
    if key in table:  # a flat name written as a recipe key: say where it nests
        text += f"; {key} is the flat name of {'.'.join(table[key])}: nest it there"
    elif nested := [".".join(table[name]) for name in difflib.get_close_matches(key, list(table), n=3)]:
        text += f"; or one of the nested keys {', '.join(nested)}?"
    return text


# ---- building -------------------------------------------------------------------------------------


@dataclass
class Provenance:
    """Where a built config's values came from: the recipe, the flat parameters, what they replaced."""

    recipe: str | None
    parameters: dict[str, Any]
    overridden: dict[str, tuple[Any, Any]]  # flat name -> (recipe value, parameter value)

    def summary(self) -> str:
        parts = [f"recipe {self.recipe or '(none: the defaults)'}"]
        if self.parameters:
            parts.append(f"parameters {', '.join(self.parameters)}")
        if self.overridden:
            changes = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.overridden.items())
            parts.append(f"replacing the recipe's {changes}")
        return "; ".join(parts)


def assemble(cls: type[T], recipe: str | Path | Mapping | None, flat: Mapping[str, Any]) -> tuple[T, Provenance]:
    """`cls` from the defaults, then the recipe, then the flat parameters; every problem in one ConfigError."""
    table = parameters_of(cls)
    found = unknown_names(flat, list(table))
    loaded = load_recipe(cls, recipe) if recipe is not None else Recipe(None)
    config = cls()
    for path, value in loaded.values.items():
        set_path(config, path, value)
    overridden = {}
    for name, value in flat.items():
        if name in table:
            path = table[name].path
            if path in loaded.values and loaded.values[path] != value:
                overridden[name] = (loaded.values[path], value)
            set_path(config, path, value)
    share(config)
    found += problems(config)
    if found:
        raise ConfigError(found, where=f"{cls.__name__} (recipe {loaded.source})" if loaded.source else cls.__name__)
    return config, Provenance(loaded.source, dict(flat), overridden)


def build(cls: type[T], recipe: str | Path | Mapping | None = None, /, **flat: Any) -> T:
    """`cls` from a recipe (a bundled name, a YAML path, or the mapping of one section) and flat overrides
    (papermill names); every problem in one ConfigError. Overrides of recipe values are logged."""
    config, provenance = assemble(cls, recipe, flat)
    if provenance.overridden:
        log.info("%s: %s", cls.__name__, provenance.summary())
    return config


# ---- validation -----------------------------------------------------------------------------------


def _check_model(value: str) -> str | None:
    try:
        check_model_available(value)
    except (ValueError, OSError) as e:  # OSError: the cache the bundled model is converted into
        return str(e)
    return None


def _check_adapter(value: str) -> str | None:
    if (Path(value).expanduser() / "adapter_config.json").is_file():
        return None
    return "a folder with a saved adapter (adapter_config.json), or None for the base model: no such adapter"


def _check_pairs(spec: str, allow_missing_instruction: bool = False) -> str | None:
    """None when `spec` names data that exists and parses; the first problem otherwise (file:line)."""
    formats = "bundled:<split>, a .jsonl/.json/.csv file, or hf:<dataset_id>[@split]"
    if spec.startswith("hf:"):
        return None if spec.removeprefix("hf:").strip() else formats  # read from the hub when the run starts
    if spec.startswith("bundled:"):
        splits = ("seed", "heldout", "unlabeled")
        return (
            None if spec.removeprefix("bundled:") in splits else f"bundled:{' | bundled:'.join(splits)}, or {formats}"
        )
    try:
        data.load_pairs(spec, allow_missing_instruction=allow_missing_instruction)
    except (OSError, data.DataError) as e:
        return f"{formats} that parses: {e}"
    return None


def _check_instructions(spec: str) -> str | None:
    from mainlib.musc.pipeline import load_instructions

    if spec == SELF_INSTRUCT:
        return None
    try:
        load_instructions(spec)
    except (OSError, KeyError, data.DataError) as e:
        return f"'self', bundled:complex_instructions, or a .jsonl of {{instruction}} records that parses: {e}"
    return None


SOURCE_CHECKS: dict[str, Callable[[str], str | None]] = {
    "model": _check_model,
    "adapter": _check_adapter,
    "pairs": _check_pairs,
    "pool": lambda spec: _check_pairs(spec, allow_missing_instruction=True),
    "instructions": _check_instructions,
}


def validate(config: Any) -> None:
    """One pass over the whole configuration before any model loads; one ConfigError lists every problem."""
    found = problems(config)
    for name, p in parameters_of(type(config)).items():
        value = get_path(config, p.path)
        kind = p.field.metadata.get("source")
        if kind and value is not None and fits(value, p.type) and (allowed := SOURCE_CHECKS[kind](value)):
            found.append(Problem(name, p.dotted, value, allowed))
    found += launch_problems(config)
    if found:
        raise ConfigError(found, where=type(config).__name__)


def launch_problems(config: Any) -> list[Problem]:
    """What this launch's process count rules out: a training batch that does not split evenly over the processes,
    and vLLM engines spanning several GPUs when each process has its own."""
    n, found = distributed.world_size(), []
    if n == 1:
        return found
    for name, p in parameters_of(type(config)).items():
        value = get_path(config, p.path)
        trains = isinstance(get_path(config, p.path[:-1]), SFTHyperparameters | DPOSettings)
        if trains and p.path[-1] == "batch_size" and isinstance(value, int) and value % n:
            allowed = f"a multiple of the {n} processes (the global micro-batch is split evenly over them)"
            found.append(Problem(name, p.dotted, value, allowed))
        if p.path == ("vllm", "tensor_parallel_size") and value != 1:
            allowed = "1 under accelerate launch (one engine per process and GPU); more only in a single process"
            found.append(Problem(name, p.dotted, value, allowed))
    return found


# ---- notebooks ------------------------------------------------------------------------------------

NOTEBOOK_NAMES = {"recipe", "In", "Out"}  # `recipe` is read here; In/Out are IPython's


_CHECKED: list[Mapping[str, Any]] = []  # kernels' globals whose variables were checked once, fresh


def from_notebook(cls: type[T], namespace: Mapping[str, Any], own: Iterable[str] = ()) -> T:
    """The config of a notebook: its `recipe`, then every variable that is a flat parameter (its parameters
    cell, `papermill -p`), validated. In a fresh kernel (papermill, Run All) any other plain variable that
    is not in `own` (the notebook's own parameters) is an error with the closest names, since a mistyped
    `-p` name would otherwise be ignored; a re-run in a live session skips that check (later cells have
    defined variables of their own by then)."""
    table, own = parameters_of(cls), set(own) | NOTEBOOK_NAMES
    flat = {k: v for k, v in namespace.items() if k in table}
    strays = {k: v for k, v in namespace.items() if k not in table and k not in own and _is_parameter(k, v)}
    if strays and not any(seen is namespace for seen in _CHECKED):
        raise ConfigError(unknown_names(strays, [*table, *sorted(own - NOTEBOOK_NAMES)]), where="notebook parameters")
    config, provenance = assemble(cls, namespace.get("recipe"), flat)
    print(f"{cls.__name__}: {provenance.summary()}")
    validate(config)
    _CHECKED.append(namespace)
    return config


def _is_parameter(name: str, value: Any) -> bool:
    return not name.startswith("_") and isinstance(value, str | int | float | bool | list | dict | tuple | None)


# ---- listing --------------------------------------------------------------------------------------


def markdown(cls: type) -> str:
    """The options of `cls` as a Markdown table (flat name, path, type, default, help)."""
    lines = ["| name | path | type | default | help |", "|---|---|---|---|---|"]
    for r in describe(cls):
        cells = [f"`{r['name']}`", r["path"], r["type"], r["default"], r["help"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def parameters_page() -> str:
    """docs/PARAMETERS.md: every option of both pipelines (`python -m mainlib.config docs > docs/PARAMETERS.md`)."""
    sections = [
        "# Parameters\n\nGenerated by `python -m mainlib.config docs > docs/PARAMETERS.md` from the config dataclasses "
        "(`mainlib/config.py`); a test checks it is current. Each name can be set in a notebook's parameters cell "
        "or with `papermill -p NAME VALUE`; a recipe (`recipes/*.yaml`) sets the same fields as nested keys "
        "(the path column). Defaults are the spec's (docs/ALGORITHMS.md); `recipes/quickstart.yaml` holds the "
        "CPU demo's sizes."
    ]
    for key, cls in CONFIGS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        sections.append(f"## `{cls.__name__}` (recipe section `{key}:`)\n\n{doc}\n\n{markdown(cls)}")
    return "\n\n".join(sections) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mainlib.config", description="List a pipeline's parameters.")
    parser.add_argument("pipeline", choices=[*CONFIGS, "docs"], help="docs: the page docs/PARAMETERS.md")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = parser.parse_args(argv)
    if args.pipeline == "docs":
        print(parameters_page(), end="")
        return
    cls = CONFIGS[args.pipeline]
    if args.markdown:
        print(markdown(cls))
        return
    for r in describe(cls):
        print(f"{r['name']:<32} {r['type']:<24} {r['default']:<24} {r['help']}")


if __name__ == "__main__":
    main()
