"""Resumable stages: skip when unchanged, rerun downstream on change, redo when killed, keep what was computed."""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import pytest

from mainlib import stages as stages_module
from mainlib.stages import (
    MANIFEST,
    Run,
    RunMismatchError,
    Stage,
    StageContext,
    UndeclaredRead,
    config_value,
    plan,
)


def compute_a(ctx: StageContext) -> dict:
    (ctx.dir / "a.txt").write_text(f"{ctx.config.data}:{ctx.config.alpha}")
    return {"rows": len(ctx.config.data)}


def compute_b(ctx: StageContext) -> dict:
    (ctx.dir / "b.txt").write_text((ctx.inputs["a"].dir / "a.txt").read_text().upper())
    return {}


CHAIN = [Stage("a", compute_a, reads=("alpha", "data")), Stage("b", compute_b, needs=("a",))]


def pipeline(run: Run, alpha: float, data: str) -> tuple[str, str]:
    """Two chained stages: `a` depends on the data and alpha, `b` on a's output."""
    done = run.execute(CHAIN, Toy(data=data, alpha=alpha))  # Toy: the config dataclass defined below
    return (done["a"].dir / "a.txt").read_text(), (done["b"].dir / "b.txt").read_text()


def test_skip_rerun_and_keep(tmp_path: Path) -> None:
    identity = {"model": "tiny"}
    run = Run(tmp_path / "run", identity)
    assert pipeline(run, 0.1, "xy") == ("xy:0.1", "XY:0.1")
    assert run.calls == {"a": 1, "b": 1}
    manifest = json.loads((tmp_path / "run" / "a" / MANIFEST).read_text())
    assert manifest["counts"] == {"rows": 2} and manifest["config"] == {"alpha": 0.1, "data": "xy"}
    assert "versions" in manifest

    again = Run(tmp_path / "run", identity)
    pipeline(again, 0.1, "xy")
    assert again.calls == {}  # both skipped

    changed = Run(tmp_path / "run", identity)
    assert pipeline(changed, 0.3, "xy") == ("xy:0.3", "XY:0.3")
    assert changed.calls == {"a": 1, "b": 1}  # a changed config reruns a and everything after it
    kept = sorted(p.name for p in (tmp_path / "run" / "_superseded").iterdir())
    assert len(kept) == 2 and (tmp_path / "run" / "_superseded" / kept[0] / "a.txt").read_text() == "xy:0.1"

    new_input = Run(tmp_path / "run", identity)
    pipeline(new_input, 0.3, "xyz")
    assert new_input.calls == {"a": 1, "b": 1}

    forced = Run(tmp_path / "run", identity, force=True)
    pipeline(forced, 0.3, "xyz")
    assert forced.calls == {"a": 1, "b": 1}


def test_killed_stage_is_redone(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", {"model": "tiny"})
    pipeline(run, 0.1, "xy")
    (tmp_path / "run" / "b" / MANIFEST).unlink()  # as if killed before the manifest was written
    (tmp_path / "run" / "b" / "partial.tmp").write_text("half")
    resumed = Run(tmp_path / "run", {"model": "tiny"})
    pipeline(resumed, 0.1, "xy")
    assert resumed.calls == {"b": 1}
    assert not (tmp_path / "run" / "b" / "partial.tmp").exists()


def test_failing_stage_writes_no_manifest(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", {"model": "tiny"})

    def boom(ctx: StageContext) -> dict:
        (ctx.dir / "started").write_text("")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        run.execute([Stage("a", boom)], Toy())
    assert not (tmp_path / "run" / "a" / MANIFEST).exists()


def test_run_of_another_experiment_is_an_error(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", {"model": "tiny", "seed_data": "bundled:seed"})
    pipeline(run, 0.1, "xy")
    with pytest.raises(RunMismatchError, match=r"model: 'tiny' there, 'other' now.*Choose another run_name"):
        Run(tmp_path / "run", {"model": "other", "seed_data": "bundled:seed"})
    assert (tmp_path / "run" / "a" / MANIFEST).is_file()  # nothing deleted


# -- declared stages -------------------------------------------------------------------------------------------


@dataclass
class Inner:
    rate: float = 0.1
    steps: int = 3


@dataclass
class Toy:
    data: str = ""
    alpha: float = 0.5
    label: str = "x"
    inner: Inner = field(default_factory=Inner)


def read_data(ctx: StageContext) -> dict:
    text = Path(ctx.config.data).read_text()
    (ctx.dir / "rows.txt").write_text(text * ctx.params["copies"])
    return {"chars": len(text)}


def scale(ctx: StageContext) -> dict:
    rows = (ctx.inputs["load"].dir / "rows.txt").read_text()
    (ctx.dir / "scaled.txt").write_text(f"{rows}:{ctx.config.alpha}:{ctx.config.inner.rate}")
    return {}


def report(ctx: StageContext) -> dict:
    (ctx.dir / "report.txt").write_text((ctx.inputs["scale"].dir / "scaled.txt").read_text() + ctx.config.label)
    return {}


TOY = [
    Stage("load", read_data, reads=("data",), files=("data",), params={"copies": 2}),
    Stage("scale", scale, reads=("alpha", "inner.rate"), needs=("load",)),
    Stage("report", report, reads=("label",), needs=("scale",)),
]


def leaf_paths(obj, prefix: str = "") -> list[str]:
    paths = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        paths += leaf_paths(value, f"{prefix}{f.name}.") if is_dataclass(value) else [prefix + f.name]
    return paths


def expected_reruns(stages, path: str) -> set[str]:
    """From the declarations alone: the stages reading `path` and everything that needs them."""
    hit = {s.name for s in stages if any(path == r or path.startswith(r + ".") for r in (*s.reads, *s.files))}
    for s in stages:  # declarations are in order, so one pass propagates downstream
        if hit & set(s.needs):
            hit.add(s.name)
    return hit


def changed(value):
    return value + "!" if isinstance(value, str) else value + 1


def test_every_field_reruns_exactly_the_stages_that_read_it(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("ab")
    base = Toy(data=str(data))
    before = plan(TOY, base)
    for path in leaf_paths(base):
        config = copy.deepcopy(base)
        *parents, leaf = path.split(".")
        target = config_value(config, ".".join(parents)) if parents else config
        if path == "data":
            other = tmp_path / "other.txt"
            other.write_text("ab")  # same bytes, another name: still a different input
            setattr(target, leaf, str(other))
        else:
            setattr(target, leaf, changed(getattr(target, leaf)))
        after = plan(TOY, config)
        assert {n for n in before if before[n] != after[n]} == expected_reruns(TOY, path), path


def test_declared_runs_skip_restore_and_rerun_downstream(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("ab")
    config = Toy(data=str(data))
    run = Run(tmp_path / "run", {"model": "tiny"})
    results = run.execute(TOY, config)
    assert (results["report"].dir / "report.txt").read_text() == "abab:0.5:0.1x" and run.calls == dict.fromkeys(
        ("load", "scale", "report"), 1
    )
    assert results["scale"].manifest["config"] == {"alpha": 0.5, "inner.rate": 0.1}

    config.label = "y"  # only the last stage reads it
    again = Run(tmp_path / "run", {"model": "tiny"})
    again.execute(TOY, config)
    assert again.calls == {"report": 1}

    config.label = "x"  # back to the earlier setting: restored from _superseded/, not recomputed
    back = Run(tmp_path / "run", {"model": "tiny"})
    results = back.execute(TOY, config)
    assert back.calls == {} and (results["report"].dir / "report.txt").read_text() == "abab:0.5:0.1x"

    data.write_text("abc")  # new data bytes rerun everything downstream of the stage reading the file
    edited = Run(tmp_path / "run", {"model": "tiny"})
    edited.execute(TOY, config, until="scale")
    assert edited.calls == {"load": 1, "scale": 1}
    with pytest.raises(ValueError, match="until must be one of load, scale, report"):
        edited.execute(TOY, config, until="nope")


def test_reading_an_undeclared_field_is_an_error(tmp_path: Path) -> None:
    def sneaky(ctx: StageContext) -> dict:
        return {"steps": ctx.config.inner.steps}  # declared only inner.rate

    data = tmp_path / "data.txt"
    data.write_text("ab")
    stages = [*TOY[:1], Stage("scale", sneaky, reads=("inner.rate",), needs=("load",))]
    with pytest.raises(UndeclaredRead, match=r"'scale' reads config.inner.steps.*add 'inner.steps'"):
        Run(tmp_path / "run", {}).execute(stages, Toy(data=str(data)))
    assert not (tmp_path / "run" / "scale" / MANIFEST).exists()


def test_bad_declarations_are_errors(tmp_path: Path) -> None:
    config = Toy(data=str(tmp_path / "data.txt"))
    with pytest.raises(ValueError, match=r"'report' needs \['scale'\], which are not declared before it"):
        plan([TOY[0], TOY[2]], config)
    with pytest.raises(ValueError, match=r"config path 'inner\.rat'"):
        plan([Stage("x", report, reads=("inner.rat",))], config)


def test_resumable_stage_continues_an_unfinished_attempt(tmp_path: Path) -> None:
    attempts = []

    def shards(ctx: StageContext) -> dict:
        done = sorted(p.name for p in ctx.dir.glob("shard-*"))
        attempts.append(done)
        for i in range(len(done), 3):
            (ctx.dir / f"shard-{i}").write_text(str(i))
            if i == 1 and len(attempts) == 1:
                raise KeyboardInterrupt  # killed after two shards
        return {"shards": 3}

    for resumable, expected in ((True, ["shard-0", "shard-1"]), (False, [])):
        attempts.clear()
        stages = [Stage("s", shards, resumable=resumable)]
        with pytest.raises(KeyboardInterrupt):
            Run(tmp_path / str(resumable), {}).execute(stages, Toy())
        Run(tmp_path / str(resumable), {}).execute(stages, Toy())
        assert attempts[1] == expected


def test_code_edits_change_the_fingerprint(tmp_path: Path, monkeypatch) -> None:
    module_file = tmp_path / "toy_prompts.py"
    module_file.write_text("TEMPLATE = 'Q: {x}'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toy_prompts")
    stages = [Stage("s", report, code=(module,))]
    before = plan(stages, Toy())
    module_file.write_text("TEMPLATE = 'Question: {x}'\n")
    stages_module._source_hash.cache_clear()
    assert plan(stages, Toy()) != before
