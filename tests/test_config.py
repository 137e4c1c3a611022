"""The configuration: flat names derived from the dataclasses, recipes, and one validation before any work."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml

from mainlib import config as cfg
from mainlib.config import ConfigError, MainConfig, MuscConfig, build, describe, flat_parameters, validate
from mainlib.parameters import parameters_of, shared_fields
from mainlib.sft import SFTSettings

REPO = Path(__file__).resolve().parents[1]
CONFIGS = (MainConfig, MuscConfig)

# The flat names the notebooks used before the recipes (pipeline.FLAT_PARAMETERS, musc.pipeline.FLAT_PARAMETERS):
# each must still name the same field.
OLD_MAIN = {
    **{k: (k,) for k in ("run_name", "runs_dir", "model", "quantization", "seed_data", "pool_data")},
    **{k: (k,) for k in ("n_seed", "n_pool", "max_length", "seed")},
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "learning_rate": ("sft", "learning_rate"),
    "epochs": ("sft", "epochs"),
    "batch_size": ("sft", "batch_size"),
    "final_learning_rate": ("final_sft", "learning_rate"),
    "final_epochs": ("final_sft", "epochs"),
    "round_learning_rate": ("round_sft", "learning_rate"),
    "round_epochs": ("round_sft", "epochs"),
    **{
        k: ("main", k)
        for k in (
            "rounds",
            "alpha_schedule",
            "alpha_start",
            "alpha_end",
            "filter_method",
            "score_normalization",
            "lam",
            "top_fraction",
            "threshold",
            "humpback_min_rating",
            "final_alpha",
            "system_seed",
            "system_synthetic",
        )
    },
    "round_max_new_tokens": ("round_generation", "max_new_tokens"),
    "synthesis_max_new_tokens": ("synthesis", "max_new_tokens"),
    "synthesis_temperature": ("synthesis", "temperature"),
    "synthesis_top_p": ("synthesis", "top_p"),
}
OLD_MUSC = {
    **{k: (k,) for k in ("run_name", "runs_dir", "model", "adapter", "quantization", "instructions", "n", "seed")},
    "self_instruct_constraints": ("self_instruct_constraints",),
    "decompose": ("coarse", "decompose"),
    "recombine": ("coarse", "recombine"),
    "min_constraints": ("coarse", "min_constraints"),
    "drop_unfinished": ("coarse", "drop_unfinished"),
    "drop_ratio": ("coarse", "corruption", "drop_ratio"),
    "p_drop": ("coarse", "corruption", "p_drop"),
    "p_substitute": ("coarse", "corruption", "p_substitute"),
    "p_negate": ("coarse", "corruption", "p_negate"),
    "helper_max_new_tokens": ("coarse", "helper", "max_new_tokens"),
    "response_max_new_tokens": ("coarse", "respond", "max_new_tokens"),
    "response_temperature": ("coarse", "respond", "temperature"),
    "weight_mode": ("weights", "mode"),
    "w_max": ("weights", "w_max"),
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "beta": ("dpo", "beta"),
    "learning_rate": ("dpo", "learning_rate"),
    "epochs": ("dpo", "epochs"),
    "batch_size": ("dpo", "batch_size"),
    "max_length": ("dpo", "max_length"),
}
# options ALGORITHMS.md asks for that the old parameters cells lacked (issue 12)
NEW_MAIN = {
    "round_temperature": ("round_generation", "temperature"),
    "round_top_p": ("round_generation", "top_p"),
    "rating_max_new_tokens": ("rating", "max_new_tokens"),
    "rating_temperature": ("rating", "temperature"),
    "grad_accum": ("sft", "grad_accum"),
    "round_grad_accum": ("round_sft", "grad_accum"),
    "final_packing": ("final_sft", "packing"),
    "gradient_checkpointing": ("sft", "gradient_checkpointing"),
    "lora_target_modules": ("lora", "target_modules"),
}
NEW_MUSC = {
    "helper_temperature": ("coarse", "helper", "temperature"),
    "warmup": ("dpo", "warmup"),
    "scheduler": ("dpo", "scheduler"),
    "grad_accum": ("dpo", "grad_accum"),
    "gradient_checkpointing": ("dpo", "gradient_checkpointing"),
    "lora_target_modules": ("lora", "target_modules"),
}


def leaf_paths(cls: type, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every leaf field under `cls`, found independently of mainlib.parameters."""
    found = set()
    for f in dataclasses.fields(cls):
        annotation = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(annotation):
            found |= leaf_paths(annotation, (*path, f.name))
        else:
            found.add((*path, f.name))
    return found


def errors(exc: pytest.ExceptionInfo) -> str:
    return str(exc.value)


# ---- the derived table ------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "old", "new"), [(MainConfig, OLD_MAIN, NEW_MAIN), (MuscConfig, OLD_MUSC, NEW_MUSC)])
def test_flat_table_covers_every_leaf_and_keeps_the_old_names(cls, old, new) -> None:
    table = flat_parameters(cls)
    assert set(table.values()) | set(shared_fields(cls)) == leaf_paths(cls)  # every leaf: a name or a follower
    assert len(set(table.values())) == len(table)  # one name per field
    assert {name: table.get(name) for name in old} == old
    assert {name: table.get(name) for name in new} == new


@dataclass
class Inner:
    rate: float = field(default=1.0, metadata={"help": "a rate"})


@dataclass
class Clash:
    rate: float = field(default=1.0, metadata={"help": "a rate"})
    inner: Inner = field(default_factory=Inner, metadata={"help": "nested", "prefix": ""})


@dataclass
class NoClash:
    rate: float = field(default=1.0, metadata={"help": "a rate"})
    inner: Inner = field(default_factory=Inner, metadata={"help": "nested"})  # prefix inner_


def test_two_leaves_with_one_flat_name_are_an_error() -> None:
    with pytest.raises(TypeError, match=r"'rate' would mean both rate and inner\.rate"):
        flat_parameters(Clash)
    assert flat_parameters(NoClash) == {"rate": ("rate",), "inner_rate": ("inner", "rate")}


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_option_has_help_and_describe_lists_it(cls, capsys) -> None:
    missing = [name for name, p in parameters_of(cls).items() if len(p.help.strip()) < 8]
    assert not missing, f"{cls.__name__}: no help for {missing}"

    def without_help(c: type, path: str = "") -> list[str]:  # every field, nested settings and followers too
        found = []
        for f in dataclasses.fields(c):
            if len(f.metadata.get("help", "").strip()) < 8:
                found.append(f"{path}{f.name}")
            annotation = get_type_hints(c)[f.name]
            if dataclasses.is_dataclass(annotation):
                found += without_help(annotation, f"{path}{f.name}.")
        return found

    assert not without_help(cls)
    rows = describe(cls)
    assert [r["name"] for r in rows] == list(flat_parameters(cls))
    defaults = cls()
    by_name = {r["name"]: r for r in rows}
    assert by_name["learning_rate"]["default"] == repr(
        defaults.sft.learning_rate if cls is MainConfig else defaults.dpo.learning_rate
    )
    cfg.main([cls.recipe_section])
    listing = capsys.readouterr().out
    assert all(re.search(rf"^{name}\s", listing, re.MULTILINE) for name in flat_parameters(cls))


def test_docs_parameters_page_is_up_to_date() -> None:
    page = (REPO / "docs" / "PARAMETERS.md").read_text(encoding="utf-8")
    assert page == cfg.parameters_page(), "regenerate: python -m mainlib.config docs > docs/PARAMETERS.md"
    assert all(f"| `{name}` |" in page for cls in CONFIGS for name in flat_parameters(cls))


# ---- recipes and overrides ------------------------------------------------------------------------------


def test_recipe_unknown_key_names_the_file_the_key_and_a_suggestion(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({"main": {"sft": {"learnign_rate": 1e-3}, "main": {"rownds": 2}}, "muscc": {}}))
    with pytest.raises(ConfigError) as exc:
        build(MainConfig, recipe)
    text = errors(exc)
    assert text.startswith(str(recipe))
    assert "main.sft.learnign_rate" in text and "did you mean learning_rate?" in text
    assert "main.main.rownds" in text and "did you mean rounds?" in text
    assert "muscc" in text and "did you mean musc?" in text
    with pytest.raises(ConfigError, match=r"parameter musc: got None; allowed: a `musc:` section"):
        build(MuscConfig, recipe)
    recipe.write_text(yaml.safe_dump({"main": {"learning_rate": 1e-3}}))
    with pytest.raises(ConfigError, match=r"learning_rate is the flat name of sft\.learning_rate: nest it there"):
        build(MainConfig, recipe)
    with pytest.raises(
        ConfigError, match=r"parameter lerning_rate: got 0\.1; allowed: no such parameter; did you mean"
    ):
        build(MainConfig, "quickstart", lerning_rate=0.1)
    with pytest.raises(ConfigError, match=r"parameter recipe: got 'quickstrat'; .*did you mean quickstart\?"):
        build(MainConfig, "quickstrat")


def test_wrong_types_name_the_parameter(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"parameter learning_rate \(sft\.learning_rate\): got 'fast'; allowed: float"
    ):
        build(MainConfig, learning_rate="fast")
    with pytest.raises(ConfigError, match=r"parameter batch_size \(sft\.batch_size\): got True; allowed: int"):
        build(MainConfig, batch_size=True)
    with pytest.raises(ConfigError, match=r"parameter n_seed: got 'all'; allowed: int \| None"):
        build(MainConfig, n_seed="all")
    with pytest.raises(
        ConfigError, match=r"parameter weight_mode \(weights\.mode\): got 'entropy'; allowed: 'none' \|"
    ):
        build(MuscConfig, weight_mode="entropy")
    assert build(MainConfig, n_seed=None, epochs=2).sft.epochs == 2  # None where allowed; an int is a float
    recipe = tmp_path / "typed.yaml"
    recipe.write_text("musc:\n  dpo:\n    learning_rate: 5e-6\n")  # a number (YAML 1.1 alone: a string)
    assert build(MuscConfig, recipe).dpo.learning_rate == 5e-6
    recipe.write_text("musc:\n  dpo:\n    learning_rate: '5e-6'\n")
    with pytest.raises(ConfigError, match=r"learning_rate: got '5e-6'; allowed: float \('5e-6' is text: write"):
        build(MuscConfig, recipe)


def test_exclusive_options_are_an_error_never_a_choice() -> None:
    with pytest.raises(ConfigError, match=r"parameter top_fraction .*None while threshold is set \(0\.2\)"):
        build(MainConfig, threshold=0.2)  # top_fraction keeps its default 0.5
    chosen = build(MainConfig, top_fraction=None, threshold=0.2)
    assert (chosen.main.top_fraction, chosen.main.threshold) == (None, 0.2)
    with pytest.raises(ConfigError, match=r"parameter top_fraction .*a fraction in \(0, 1\], or set threshold"):
        build(MainConfig, top_fraction=None)  # neither: nothing says what to select
    assert build(MainConfig, top_fraction=None, filter_method="humpback").main.threshold is None


def test_overrides_win_over_the_recipe_and_are_recorded(tmp_path: Path) -> None:
    config, provenance = cfg.assemble(MainConfig, "quickstart", {"n_seed": 8, "rounds": 1})
    assert config.n_seed == 8 and provenance.overridden == {"n_seed": (32, 8)}  # rounds: the recipe's own value
    assert "n_seed 32 -> 8" in provenance.summary()


def test_each_sft_has_its_own_sizes_and_nothing_is_copied() -> None:
    config = build(MainConfig, "quickstart", batch_size=4, final_batch_size=2, max_length=160, seed=5)
    assert (config.sft.batch_size, config.round_sft.batch_size, config.final_sft.batch_size) == (4, 8, 2)
    for sft in (config.sft, config.round_sft, config.final_sft):  # run-wide settings have one home each
        assert not {"max_length", "seed", "direction"} & set(sft.to_dict())
    assert (config.max_length, config.seed) == (160, 5)
    with pytest.raises(ConfigError, match=r"parameter round_sft: got SFTSettings\(.*\); allowed: SFTHyperparameters"):
        validate(MainConfig(round_sft=SFTSettings(max_length=99)))  # its max_length would be ignored: refused


def test_musc_seeds_follow_the_one_seed(tmp_path: Path) -> None:
    config = build(MuscConfig, seed=3)
    coarse = config.coarse
    followers = [config.dpo.seed, coarse.seed, coarse.helper.seed, coarse.respond.seed, coarse.self_instruct.seed]
    assert followers == [3] * 5
    assert MuscConfig(seed=4).dpo.seed == 4
    recipe = tmp_path / "seeded.yaml"
    recipe.write_text(yaml.safe_dump({"musc": {"dpo": {"seed": 1}}}))
    with pytest.raises(ConfigError, match=r"musc\.dpo\.seed: got 1; allowed: no key: it follows seed"):
        build(MuscConfig, recipe)
    config.dpo.seed = 9  # set behind the config's back: caught, not used silently
    with pytest.raises(ConfigError, match=r"parameter dpo\.seed: got 9; allowed: the value of seed \(3\)"):
        validate(config)


# ---- validation before work -------------------------------------------------------------------------


def refuse_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way a pipeline loads a model or tokenizer fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was validated")

    import mainlib.models
    import mainlib.musc.pipeline
    import mainlib.pipeline
    import mainlib.sft

    for module in (mainlib.models, mainlib.sft, mainlib.pipeline, mainlib.musc.pipeline):
        for name in ("load_model", "load_adapter", "load_tokenizer"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fail)


def test_run_main_reports_every_problem_before_loading_a_model(monkeypatch, tmp_path: Path) -> None:
    from mainlib.mutual import MainSettings
    from mainlib.pipeline import run_main

    refuse_to_load(monkeypatch)
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"response": "fine"}\n{"response": "broken"\n')
    config = MainConfig(
        runs_dir=str(tmp_path / "runs"),
        model="smollm2-135m-instruc",
        seed_data=str(tmp_path / "missing.jsonl"),
        pool_data=str(pool),
        main=MainSettings(alpha_end=1.5, final_alpha=2.0, threshold=0.1),
    )
    with pytest.raises(ConfigError) as exc:
        run_main(config)
    text = errors(exc)
    for name in ("model", "seed_data", "pool_data", "alpha_end", "final_alpha", "top_fraction"):
        assert re.search(rf"^  parameter {name}[ :]", text, re.MULTILINE), name
    assert f"{pool}:2: invalid JSON" in text and "missing.jsonl: no such file" in text
    assert "Did you mean 'smollm2-135m-instruct'?" in text
    assert "6 invalid parameter(s)" in text.splitlines()[0]
    assert not (tmp_path / "runs").exists()


def test_run_musc_reports_every_problem_before_loading_a_model(monkeypatch, tmp_path: Path) -> None:
    from mainlib.musc.pipeline import run_musc

    refuse_to_load(monkeypatch)
    instructions = tmp_path / "instructions.jsonl"
    instructions.write_text('{"instruction": "Write a poem."}\n{"prompt": "no instruction field"}\n')
    config = build(MuscConfig, "quickstart", instructions=str(instructions), adapter=str(tmp_path / "nowhere"))
    config.weights.mode = "entropy"
    config.coarse.corruption.p_drop = 0.9  # the probabilities no longer sum to 1
    with pytest.raises(ConfigError) as exc:
        run_musc(config)
    text = errors(exc)
    for name in ("instructions", "adapter", "weight_mode"):
        assert re.search(rf"^  parameter {name}[ :]", text, re.MULTILINE), name
    assert f"{instructions}:2: field 'instruction'" in text
    config.weights.mode = "kl"
    config.instructions, config.adapter = "bundled:complex_instructions", None
    with pytest.raises(ConfigError, match=r"p_drop \+ p_substitute \+ p_negate must be 1"):
        run_musc(config)  # a rule between fields, checked once each field is fine on its own


# ---- the bundled recipes ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CONFIGS)
@pytest.mark.parametrize("recipe", ["quickstart", "paper"])
def test_bundled_recipes_build_and_validate(cls, recipe: str) -> None:
    config = build(cls, recipe)
    validate(config)
    assert build(cls, REPO / "recipes" / f"{recipe}.yaml") == config  # the repository's recipes/ is the same file
    assert (REPO / "mainlib" / "recipes" / f"{recipe}.yaml").is_file()  # packaged with mainlib


def test_quickstart_keeps_the_demo_numbers() -> None:
    """The numbers notebooks 00-04 used before the recipes existed (so the demo's runtime is unchanged)."""
    main = build(MainConfig, "quickstart")
    assert (main.n_seed, main.n_pool, main.max_length, main.seed) == (32, 48, 192, 0)
    assert (main.lora.r, main.lora.alpha, main.lora.dropout, main.lora.target_modules) == (8, 16, 0.05, "all-linear")
    sizes = [
        (s.learning_rate, s.epochs, s.batch_size, s.grad_accum) for s in (main.sft, main.round_sft, main.final_sft)
    ]
    assert sizes == [(1e-3, 2.0, 8, 1), (5e-4, 1.0, 8, 1), (1e-3, 1.0, 8, 1)]
    assert all((s.warmup, s.scheduler) == (0.05, "cosine") for s in (main.sft, main.round_sft, main.final_sft))
    assert (main.main.rounds, main.main.top_fraction, main.main.final_alpha) == (1, 0.5, 0.5)
    generation = [(g.max_new_tokens, g.temperature, g.top_p) for g in (main.round_generation, main.synthesis)]
    assert generation == [(96, 0.7, 0.9), (64, 0.7, 0.9)]
    assert (main.rating.max_new_tokens, main.rating.temperature) == (12, 0.0)
    musc = build(MuscConfig, "quickstart")
    assert (musc.n, musc.coarse.recombine, musc.coarse.decompose, musc.lora.r, musc.lora.alpha) == (
        32,
        "template",
        "model",
        8,
        16,
    )
    dpo = musc.dpo
    assert (dpo.learning_rate, dpo.epochs, dpo.batch_size, dpo.grad_accum, dpo.max_length) == (1e-4, 3.0, 4, 1, 512)
    assert (dpo.beta, dpo.warmup, dpo.scheduler, musc.weights.mode, musc.weights.w_max) == (0.1, 0.1, "cosine", "kl", 2)
    assert (musc.coarse.helper.max_new_tokens, musc.coarse.respond.max_new_tokens) == (160, 256)


def spec_numbers() -> dict[tuple[str, tuple[str, ...]], object]:
    """(pipeline, attribute path) -> the value docs/ALGORITHMS.md states, read from its text."""
    spec = (REPO / "docs" / "ALGORITHMS.md").read_text(encoding="utf-8")

    def find(pattern: str) -> tuple[str, ...]:
        match = re.search(pattern, spec)
        assert match, f"ALGORITHMS.md no longer says {pattern!r}"
        return match.groups()

    alpha_start, alpha_end = find(r"default linear ([\d.]+) → ([\d.]+)")
    temperature, top_p = find(r"T=([\d.]+), top-p ([\d.]+)\s+by default")
    beta, lr, epochs, warmup, batch, cutoff = find(
        r"β ([\d.]+), lr ([\d.e-]+),\s+(\d+) epochs, cosine schedule, warmup ([\d.]+), "
        r"effective batch (\d+), cutoff (\d+)"
    )
    n_seed, sft_lr, sft_batch = find(r"Seed ([\d,]+) OpenAssistant .*; lr ([\d.e-]+), batch (\d+)\.")
    p_drop, p_substitute, p_negate = find(
        r"dropped \(p = ([\d.]+)\),\s+replaced by a deviating constraint \(p = ([\d.]+)\) or negated \(p = ([\d.]+)\)"
    )
    numbers = {
        ("main", ("main", "alpha_schedule")): find(r"default (linear) [\d.]+ →")[0],
        ("main", ("main", "alpha_start")): float(alpha_start),
        ("main", ("main", "alpha_end")): float(alpha_end),
        ("main", ("main", "final_alpha")): float(alpha_end),  # "with the same α weighting"
        ("main", ("main", "lam")): float(find(r"λ = ([\d.]+) by default")[0]),
        ("main", ("main", "top_fraction")): float(find(r"`top_fraction` \(default ([\d.]+)\)")[0]),
        ("main", ("main", "score_normalization")): find(r"`score_normalization` \*\*\[our choice, default `(\w+)`")[0],
        ("main", ("main", "humpback_min_rating")): int(find(r"`humpback_min_rating` \(default (\d)\)")[0]),
        ("main", ("synthesis", "temperature")): float(temperature),
        ("main", ("synthesis", "top_p")): float(top_p),
        ("main", ("round_generation", "temperature")): float(temperature),
        ("main", ("round_generation", "top_p")): float(top_p),
        ("main", ("n_seed",)): int(n_seed.replace(",", "")),
        ("main", ("max_length",)): int(cutoff),
        ("musc", ("coarse", "helper", "temperature")): float(find(r"low temperature ≈ ([\d.]+)")[0]),
        ("musc", ("coarse", "min_constraints")): int(find(r"fewer\s+than (\d+) constraints")[0]),
        ("musc", ("coarse", "corruption", "drop_ratio")): float(find(r"default drop_ratio ([\d.]+)")[0]),
        ("musc", ("coarse", "corruption", "p_drop")): float(p_drop),
        ("musc", ("coarse", "corruption", "p_substitute")): float(p_substitute),
        ("musc", ("coarse", "corruption", "p_negate")): float(p_negate),
        ("musc", ("coarse", "respond", "temperature")): float(find(r"\(T ≈ ([\d.]+)\)")[0]),
        ("musc", ("self_instruct_constraints",)): int(find(r"task with more than (\d+) constraints")[0]),
        ("musc", ("weights", "w_max")): float(find(r"w_max = (\d+)")[0]),
        ("musc", ("dpo", "beta")): float(beta),
        ("musc", ("dpo", "learning_rate")): float(lr),
        ("musc", ("dpo", "epochs")): float(epochs),
        ("musc", ("dpo", "warmup")): float(warmup),
        ("musc", ("dpo", "scheduler")): "cosine",
        ("musc", ("dpo", "max_length")): int(cutoff),
    }
    for section in ("sft", "round_sft", "final_sft"):
        numbers[("main", (section, "learning_rate"))] = float(sft_lr)
    numbers[("main", ("sft", "effective_batch"))] = int(sft_batch)
    numbers[("musc", ("dpo", "effective_batch"))] = int(batch)
    assert "KL_t = KL(" in spec and "LoRA on all linear layers" in spec and "plain LoRA on CPU" in spec
    return numbers


def test_paper_recipe_and_the_defaults_are_the_spec() -> None:
    """recipes/paper.yaml (each number cites its ALGORITHMS.md line) and the dataclass defaults both equal the
    numbers the spec's text gives."""
    for recipe in ("paper", None):
        configs = {"main": build(MainConfig, recipe), "musc": build(MuscConfig, recipe)}
        for (section, path), expected in spec_numbers().items():
            obj = configs[section]
            for part in path[:-1]:
                obj = getattr(obj, part)
            if path[-1] == "effective_batch":
                value = obj.batch_size * obj.grad_accum
            elif recipe is None and path == ("n_seed",):
                continue  # the default is all seed pairs; the paper recipe names Humpback's 3,200
            else:
                value = getattr(obj, path[-1])
            assert value == expected, (recipe, section, path, value, expected)
        assert configs["musc"].weights.mode == "kl" and configs["main"].lora.target_modules == "all-linear"
        assert configs["main"].quantization == configs["musc"].quantization == "auto"


def numeric_leaves(value: object) -> dict[str, float]:
    """The numbers of a parsed YAML line by key (nested mappings flattened)."""
    leaves: dict[str, float] = {}
    for key, sub in value.items() if isinstance(value, dict) else ():
        if isinstance(sub, dict):
            leaves |= numeric_leaves(sub)
        elif isinstance(sub, int | float) and not isinstance(sub, bool):
            leaves[key] = float(sub)
    return leaves


def test_paper_recipe_numbers_are_on_the_lines_they_cite() -> None:
    """Each number of recipes/paper.yaml appears on the ALGORITHMS.md line(s) its comment cites (an effective
    batch as batch_size x grad_accum; temperature 0 as "greedy")."""
    spec = (REPO / "docs" / "ALGORITHMS.md").read_text(encoding="utf-8").splitlines()
    checked = 0
    for line in (REPO / "recipes" / "paper.yaml").read_text(encoding="utf-8").splitlines():
        code, _, comment = line.partition("#")
        leaves = numeric_leaves(yaml.safe_load(code.strip()) or {}) if code.strip() else {}
        if not leaves:
            continue
        cited = re.match(r"\s*lines? ([\d, -]+(?:and [\d, -]+)?)", re.sub(r"\([^)]*\)", "", comment))
        assert cited, f"no citation: {line}"
        numbers = [int(n) for n in re.findall(r"\d+", cited.group(1))]
        spans = re.findall(r"(\d+)-(\d+)", cited.group(1))
        lines = set(numbers) | {n for a, b in spans for n in range(int(a), int(b) + 1)}
        text = " ".join(spec[n - 1] for n in sorted(lines))
        found = {float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?(?:e-?\d+)?", text)}
        if "batch_size" in leaves and "grad_accum" in leaves:
            leaves["effective batch"] = leaves.pop("batch_size") * leaves.pop("grad_accum")
        for key, value in leaves.items():
            assert value in found or (value == 0 and key == "temperature" and "greedy" in text), (key, value, line)
            checked += 1
    assert checked >= 30


# ---- notebooks ----------------------------------------------------------------------------------------


def parameters_cell(name: str) -> dict[str, object]:
    notebook = json.loads((REPO / "notebooks" / name).read_text(encoding="utf-8"))
    cell = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


@pytest.mark.parametrize(
    ("name", "cls", "own"),
    [
        ("01_forward_reverse.ipynb", MainConfig, {"results_dir", "show_data", "n_show", "max_new_tokens"}),
        ("02_synthesize.ipynb", MainConfig, {"results_dir"}),
        ("03_mutual_filter.ipynb", MainConfig, {"results_dir", "n_auc"}),
        ("04_musc.ipynb", MuscConfig, {"results_dir"}),
    ],
)
def test_parameters_cells_hold_a_recipe_and_a_few_names(name: str, cls: type, own: set[str]) -> None:
    values = parameters_cell(name)
    assert values.pop("recipe") == "quickstart"
    config_names = {k: v for k, v in values.items() if k not in own}
    assert set(config_names) <= set(flat_parameters(cls)) and len(config_names) <= 8, config_names
    location = {"run_name", "runs_dir"}
    for recipe in ("quickstart", "paper"):  # the cell does not change a bundled recipe
        built = build(cls, recipe)
        table = flat_parameters(cls)
        assert {k: v for k, v in config_names.items() if k not in location} == {
            k: cfg.get_path(built, table[k]) for k in config_names if k not in location
        }
    namespace = {**values, "recipe": "quickstart", "lerning_rate": 1e-3}
    with pytest.raises(ConfigError, match=r"parameter lerning_rate: got 0\.001; allowed: no such parameter; did you"):
        cfg.from_notebook(cls, namespace, own=own)
    del namespace["lerning_rate"]
    assert cfg.from_notebook(cls, namespace, own=own) == build(cls, "quickstart", **config_names)
