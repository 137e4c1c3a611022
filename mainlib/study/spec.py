"""The study files (`sweeps/study_main.yaml`, `sweeps/study_musc.yaml`): a recipe, and per profile the config
overrides (flat names, as in the notebooks) and the study's own sizes. Checked whole before any cell runs.

    study: main                      # main or musc
    recipe: quickstart               # the config every cell starts from (a profile may set its own)
    profiles:
      cpu:
        config: {n_pool: 400, rounds: 2}          # flat MainConfig / MuscConfig names
        sizes: {seeds: [0, 1, 2], test_problems: 300}   # MainSizes / MuscSizes fields
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from mainlib.config import CONFIGS, build
from mainlib.parameters import ConfigError, Problem, problems, unknown_names
from mainlib.yamlfile import load_yaml

PROFILES = ("smoke", "cpu", "gpu")
FILES = {"main": "study_main.yaml", "musc": "study_musc.yaml"}
Arm = Literal["seed_only", "unfiltered", "random", "humpback", "mutual"]  # claim 2's training sets


@dataclass
class MainSizes:
    """How much of MAIN the study measures (claims 1-3)."""

    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "one pipeline per seed (sampling, synthesis, training): every MAIN claim is per seed"},
    )
    top_fractions: list[float] = field(
        default_factory=lambda: [0.25, 0.5], metadata={"help": "claim 1: shares of the pool each filter keeps"}
    )
    arm_fraction: float = field(
        default=0.5,
        metadata={"help": "claim 2: share of the candidates every filtered arm trains on", "range": "(0, 1]"},
    )
    headline_arms: list[Arm] = field(
        default_factory=lambda: ["random", "humpback", "mutual"],
        metadata={"help": "claim 2: arms trained with every seed (mutual is compared with each other arm)"},
    )
    ablation_arms: list[Arm] = field(
        default_factory=lambda: ["seed_only", "unfiltered"],
        metadata={"help": "claim 2: arms trained with the first seed only (single-seed in every table)"},
    )
    rounds_seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "claim 3: the seeds whose rounds cell runs (not a headline claim: one seed by default)"},
    )
    heldout_responses: int = field(
        default=100,
        metadata={
            "help": "claim 3: pool responses outside the run's pool, to recover the instructions of",
            "range": "[2, inf)",
        },
    )
    test_problems: int = field(
        default=300, metadata={"help": "claim 2: GSM8K test problems for the solution NLL", "range": "[2, inf)"}
    )
    fewshot_problems: int = field(
        default=100, metadata={"help": "claim 2: GSM8K test problems for 5-shot accuracy", "range": "[1, inf)"}
    )
    fewshot_seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "claim 2: the seeds whose arms also get GSM8K accuracy"}
    )
    max_gen_toks: int = field(
        default=256, metadata={"help": "claim 2: GSM8K generation cap (lm-eval's default: 256)", "range": "[1, inf)"}
    )

    def rules(self) -> list[tuple[str, Any, str]]:
        """Claim 2 compares mutual with every other arm, so mutual runs with every seed; the seeds of claims 2's
        accuracy and 3 are among the pipelines' seeds."""
        found = []
        if "mutual" not in self.headline_arms:
            found.append(
                ("headline_arms", self.headline_arms, "a list holding 'mutual': claim 2 compares it with each arm")
            )
        for name in ("rounds_seeds", "fewshot_seeds"):
            if not set(getattr(self, name)) <= set(self.seeds):
                found.append((name, getattr(self, name), f"seeds among `seeds` ({self.seeds})"))
        return found


@dataclass
class MuscSizes:
    """How much of MuSC the study measures (claim 4)."""

    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "headline cells (plain DPO and the spec's kl): one preference set and one policy per seed"},
    )
    headline_modes: list[str] = field(
        default_factory=lambda: ["none", "kl"], metadata={"help": "weight modes run with every seed"}
    )
    ablation_modes: list[str] = field(
        default_factory=lambda: ["bikl", "pmi"], metadata={"help": "weight modes run with the first seed only"}
    )
    ifeval_task: str = field(
        default="mainlib_ifeval_subset",
        metadata={"help": "lm-eval task: mainlib_ifeval_subset (272 fixed prompts) or mainlib_ifeval (541)"},
    )
    ifeval_limit: int | None = field(
        default=None, metadata={"help": "first N prompts of the task only (smoke); None: all", "range": "[1, inf)"}
    )
    max_gen_toks: int = field(
        default=256, metadata={"help": "IFEval's generation cap, the same for every cell", "range": "[1, inf)"}
    )


SIZES: dict[str, type] = {"main": MainSizes, "musc": MuscSizes}


@dataclass
class StudySpec:
    study: str  # main or musc
    recipe: str
    profile: str
    config: dict[str, Any]  # flat overrides of the recipe
    sizes: Any  # MainSizes or MuscSizes
    path: Path

    def build(self, **flat: Any) -> Any:
        """The cell's config: recipe, then the profile's overrides, then the cell's own."""
        return build(CONFIGS[self.study], self.recipe, **{**self.config, **flat})


def _sizes(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError([Problem("sizes", "sizes", raw, "a mapping of size names to values")], where=where)
    found = unknown_names(raw, [f.name for f in fields(cls)])
    if found:
        raise ConfigError(found, where=where)
    sizes = cls(**raw)
    if found := problems(sizes):
        raise ConfigError(found, where=where)
    return sizes


def load_spec(path: str | Path, profile: str) -> StudySpec:
    """One profile of a study file, checked: its fields, the sizes, and that the config builds."""
    path = Path(path)
    raw = load_yaml(path)
    where = f"{path}"
    if not isinstance(raw, dict) or raw.get("study") not in SIZES:
        raise ValueError(f"{path}: 'study' must be one of {', '.join(SIZES)}")
    unknown = set(raw) - {"study", "recipe", "profiles"}
    if unknown:
        raise ValueError(f"{path}: unknown fields {sorted(unknown)}; allowed: study, recipe, profiles")
    profiles = raw.get("profiles") or {}
    if profile not in profiles:
        raise ValueError(f"{path}: no profile {profile!r}; it has {', '.join(profiles) or 'none'}")
    body = profiles[profile] or {}
    if unknown := set(body) - {"recipe", "config", "sizes"}:
        raise ValueError(f"{path}: profile {profile}: unknown fields {sorted(unknown)}; allowed: recipe, config, sizes")
    where = f"{path}: profile {profile}"
    spec = StudySpec(
        raw["study"],
        str(body.get("recipe") or raw.get("recipe") or "quickstart"),
        profile,
        dict(body.get("config") or {}),
        _sizes(SIZES[raw["study"]], body.get("sizes") or {}, where),
        path,
    )
    spec.build()  # a ConfigError names the file's problem now, not hours later
    return spec
