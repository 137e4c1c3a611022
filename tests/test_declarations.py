"""For every config field, changing it reruns exactly the stages that read it and the stages after them.

The expectation is derived from the pipelines' declarations (`reads`, `files`, `needs`), the outcome from the
planner's fingerprints (`stages.plan`), which is what `Run.execute` compares with the manifests on disk. With
`ConfigView` rejecting undeclared reads at run time, a stage's outputs cannot depend on a field it does not
declare, so this is the whole of "changing a field reruns what it should"."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from mainlib.config import MainConfig, MuscConfig
from mainlib.parameters import parameters_of, set_path, share
from mainlib.pipeline import main_stages
from mainlib.stages import Stage, plan


def musc_stages(config: MuscConfig) -> list[Stage]:
    from mainlib.musc.pipeline import musc_stages as declared

    return declared(config)


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf value of a config, by dotted path."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= leaves(value, f"{prefix}{f.name}.")
        else:
            out[prefix + f.name] = value
    return out


def another(value: Any) -> Any:
    """A different value of the same kind (the planner hashes values; it does not validate them)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, list | tuple):
        return [*value, "extra"]
    return 3  # None


def expected_reruns(stages: list[Stage], changed_paths: set[str], before: list[Stage]) -> set[str]:
    """Stages that read (or hash the file of) a changed path, stages whose declaration the change reshaped (new,
    other inputs or parameters: `rounds`, `filter_method`), and every stage that needs one of those."""
    old = {s.name: (s.needs, s.params) for s in before}
    hit: set[str] = set()
    for stage in stages:
        declared = (*stage.reads, *stage.files)
        reads = any(p == r or p.startswith(r + ".") for p in changed_paths for r in declared)
        if reads or old.get(stage.name) != (stage.needs, stage.params) or hit & set(stage.needs):
            hit.add(stage.name)
    return hit


CASES: list[tuple[str, Callable[[Any], list[Stage]], Callable[[], Any]]] = [
    ("main", main_stages, MainConfig),
    ("main-humpback", main_stages, lambda: dataclasses.replace(MainConfig(), main=_humpback())),
    ("main-no-rounds", main_stages, lambda: dataclasses.replace(MainConfig(), main=_no_rounds())),
    ("musc", musc_stages, MuscConfig),
    ("musc-self", musc_stages, lambda: MuscConfig(instructions="self")),
]


def _humpback():
    from mainlib.mutual import MainSettings

    return MainSettings(filter_method="humpback", rounds=2)


def _no_rounds():
    from mainlib.mutual import MainSettings

    return MainSettings(rounds=0)


@pytest.mark.parametrize(("label", "declare", "make"), CASES, ids=[c[0] for c in CASES])
def test_every_field_reruns_exactly_the_stages_that_read_it(label: str, declare, make) -> None:
    base = make()
    before = plan(declare(base), base)
    checked = 0
    for parameter in parameters_of(type(base)).values():
        config = copy.deepcopy(base)
        set_path(config, parameter.path, another(getattr_path(config, parameter.path)))
        share(config)  # fields that follow this one (MuSC's nested seeds) change with it
        changed_paths = {p for p, v in leaves(config).items() if leaves(base)[p] != v}
        stages = declare(config)
        after = plan(stages, config)
        rerun = {name for name, fp in after.items() if before.get(name) != fp}
        assert rerun == expected_reruns(stages, changed_paths, declare(base)), (
            f"{label}: changing {'.'.join(parameter.path)}"
        )
        checked += 1
    assert checked == len(parameters_of(type(base)))


def getattr_path(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = getattr(obj, part)
    return obj


def test_a_field_no_stage_reads_reruns_nothing_and_the_model_reruns_everything() -> None:
    config = MainConfig()
    stages = main_stages(config)
    assert plan(stages, dataclasses.replace(config, run_name="elsewhere")) == plan(stages, config)
    moved = plan(stages, dataclasses.replace(config, model="other-model"))
    assert all(moved[name] != fp for name, fp in plan(stages, config).items())
