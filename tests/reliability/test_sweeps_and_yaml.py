"""Issue 13: sweeps fail loudly and before the first point, YAML numbers are numbers, evaluation settings
are checked before a model loads. Fast: no model, and papermill is replaced by a fake that writes the JSON."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml

from mainlib import models
from mainlib.sweep import SweepSpec, main

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK_03 = REPO / "notebooks" / "03_mutual_filter.ipynb"


def tiny_notebook(folder: Path, tagged: bool = True, name: str = "tiny.ipynb") -> Path:
    """A notebook with two parameters that builds no config (papermill alone decides what it reads)."""
    cell = nbformat.v4.new_code_cell("alpha = 0.5\nbeta: int = 1\nresult = 'tiny'")
    if tagged:
        cell.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell("print(alpha * beta)")])
    nbformat.write(nb, folder / name)
    return folder / name


def sweep_file(folder: Path, text: str | None = None, **fields: Any) -> Path:
    """A sweep over the tiny notebook; `fields` replace the defaults, `text` replaces the whole file."""
    tiny_notebook(folder)
    spec = {"name": "s", "notebook": "tiny.ipynb", "result": "tiny", "grid": {"beta": [1, 2]}, "metrics": ["score"]}
    path = folder / "sweep.yaml"
    path.write_text(text if text is not None else yaml.safe_dump({**spec, **fields}, sort_keys=False))
    return path


# ---- 1. names a notebook does not read ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # a notebook that builds no config: its parameters cell is what papermill sets
        (dict(grid={"alpah": [0.1, 0.2]}), r"sweep\.yaml: grid\.alpah: tiny\.ipynb has no parameter alpah.*alpha"),
        (dict(parameters={"bta": 2}, grid={"alpha": [1]}), r"parameters\.bta: .*no parameter bta.*beta"),
        # both places set beta: which one wins would be silent
        (dict(parameters={"beta": 2}), r"beta is in both parameters and grid"),
        # the sweep sets these itself for every point
        (dict(parameters={"results_dir": "x"}), r"parameters\.results_dir: .*set by the sweep"),
    ],
)
def test_unknown_or_clashing_names_fail_before_the_first_point(tmp_path: Path, fields: dict, message: str) -> None:
    # old code: the first two ran every point with the default; the last two were silently overridden
    with pytest.raises(ValueError, match=message):
        SweepSpec.from_file(sweep_file(tmp_path, **fields))


def test_notebook_05_and_03_typos_name_the_sweep_and_close_matches(tmp_path: Path) -> None:
    # old code: notebook 05 (no from_notebook) accepted `limt` and started evaluating
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "notebook": str(REPO / "notebooks" / "05_evaluate.ipynb"),
                                    "result": "r", "grid": {"limt": [2]}}))  # fmt: skip
    with pytest.raises(ValueError, match=r"s\.yaml: grid\.limt: 05_evaluate\.ipynb has no parameter limt.*limit"):
        SweepSpec.from_file(path)
    path.write_text(yaml.safe_dump({"name": "s", "notebook": str(NOTEBOOK_03), "result": "r",
                                    "grid": {"top_fractoin": [0.5]}}))  # fmt: skip
    with pytest.raises(ValueError, match=r"s\.yaml: grid\.top_fractoin: .*did you mean top_fraction"):
        SweepSpec.from_file(path)


def test_a_notebook_without_a_parameters_cell_is_refused(tmp_path: Path) -> None:
    # old code: accepted; papermill put the values above the notebook's own, which then overwrote them
    path = sweep_file(tmp_path)
    tiny_notebook(tmp_path, tagged=False)
    with pytest.raises(ValueError, match=r"sweep\.yaml: tiny\.ipynb has no cell tagged `parameters`"):
        SweepSpec.from_file(path)


# ---- 4. the shape of a sweep file --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(grid=[{"alpha": 0.2}]), r"sweep\.yaml: grid must be a mapping of parameter -> list of values"),
        (dict(grid={"alpha": 0.2}), r"sweep\.yaml: grid\.alpha must be a non-empty list of values.*; got 0\.2"),
        (dict(grid={}), r"sweep\.yaml: grid must be a mapping .* at least one parameter"),
        (dict(grid=None), r"sweep\.yaml: grid must be a mapping"),
        (dict(parameters=["alpha", 1]), r"sweep\.yaml: parameters must be a mapping of parameter -> value"),
        (dict(metrics="score"), r"sweep\.yaml: metrics must be a list of dotted paths"),
        (dict(metrics=["score", 3]), r"sweep\.yaml: metrics must be a list of dotted paths .*got \['score', 3\]"),
        (dict(plot={"x": "beta", "y": "scroe"}), r"sweep\.yaml: plot\.y: 'scroe' is not a column.*beta, score"),
        (dict(plot={"x": "beta", "y": "score", "colour": "x"}), r"sweep\.yaml: plot keys are x, y, hue; got colour"),
        (dict(plot={"y": "score"}), r"sweep\.yaml: plot needs x and y"),
        (dict(name=["a", "b"]), r"sweep\.yaml: name must be a folder name"),
        (dict(name="../up"), r"sweep\.yaml: name must be a folder name"),
        (dict(result=None), r"sweep\.yaml: result must be"),
    ],
)
def test_malformed_sweep_files_fail_before_the_first_point(tmp_path: Path, fields: dict, message: str) -> None:
    # old code: AttributeError / TypeError without the file, or ran (metrics split into letters, no plot)
    with pytest.raises(ValueError, match=message):
        SweepSpec.from_file(sweep_file(tmp_path, **fields))


def test_a_sweep_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sweep\.yaml: a sweep file is a mapping of fields name, notebook"):
        SweepSpec.from_file(sweep_file(tmp_path, text="- name: x\n"))


# ---- 3. YAML numbers, syntax errors, encodings -------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("1E+5", 1e5), (".5", 0.5), ("-2e-4", -2e-4)])
def test_exponent_numbers_are_floats_in_sweeps(tmp_path: Path, text: str, value: float) -> None:
    # old code: the string '1e-3' (a point then ran with text, e.g. alpha * beta repeated a string)
    path = sweep_file(tmp_path, text=f"name: s\nnotebook: tiny.ipynb\nresult: tiny\nparameters: {{alpha: {text}}}\n"
                                     f"grid: {{beta: [{text}, 2]}}\n")  # fmt: skip
    spec = SweepSpec.from_file(path)
    assert spec.parameters["alpha"] == value and isinstance(spec.parameters["alpha"], float)
    assert spec.grid["beta"] == [value, 2]


def test_exponent_numbers_are_floats_in_recipes(tmp_path: Path) -> None:
    from mainlib.config import MainConfig, MuscConfig, build

    # old code: ConfigError "got '1e-3'; allowed: float (YAML reads 1e-3 as text ...)"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("main:\n  sft: {learning_rate: 1e-3}\nmusc:\n  dpo: {learning_rate: 5E-6}\n")
    assert build(MainConfig, recipe).sft.learning_rate == 1e-3
    assert build(MuscConfig, recipe).dpo.learning_rate == 5e-6


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path: Path) -> None:
    from mainlib.config import MainConfig, build

    # old code: `in "<unicode string>", line 4`, never the file
    path = sweep_file(tmp_path, text="name: s\nnotebook: tiny.ipynb\nresult: tiny\ngrid: {beta: [1, 2}\n")
    with pytest.raises(ValueError, match=rf"{path}:4:\d+: expected ',' or '\]'"):
        SweepSpec.from_file(path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("main:\n\tsft: {}\n")
    with pytest.raises(ValueError, match=rf"{recipe}:2:1: found character '\\t'"):
        build(MainConfig, recipe)


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    from mainlib.config import MainConfig, build

    # old code: the second `main:` silently replaced the first (sft settings lost)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("main:\n  sft: {learning_rate: 0.01}\nmain:\n  main: {rounds: 2}\n")
    with pytest.raises(ValueError, match=rf"{recipe}:3:1: key 'main' given twice \(first at line 1\)"):
        build(MainConfig, recipe)


def test_encodings(tmp_path: Path) -> None:
    from mainlib.config import MainConfig, build

    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xef\xbb\xbfmain:\n  sft: {learning_rate: 0.01}\n")  # a BOM (worked before too)
    assert build(MainConfig, recipe).sft.learning_rate == 0.01
    recipe.write_bytes(b"main:\n  # caf\xe9\n  sft: {}\n")  # Latin-1; old code: UnicodeDecodeError, no file
    with pytest.raises(ValueError, match=rf"{recipe}:2: not UTF-8 text \(byte 0xe9\)"):
        build(MainConfig, recipe)
    path = sweep_file(tmp_path)
    path.write_bytes(path.read_bytes().replace(b"name: s", b"name: s\n# \xff"))
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text"):
        SweepSpec.from_file(path)


# ---- 2. a failed point: exit status, last line, error column -----------------------------------------


def fake_papermill(monkeypatch: pytest.MonkeyPatch, result: dict[str, Any] | None = None) -> list[dict]:
    """papermill replaced: each point writes {"score": alpha * beta}; beta 99 fails like a notebook cell."""
    import papermill

    calls: list[dict] = []

    def execute_notebook(notebook: str, output: str, parameters: dict, **_: Any) -> None:
        calls.append(parameters)
        if parameters.get("beta") == 99:
            raise RuntimeError("cell 2 failed\nAssertionError: beta 99 is refused")
        out = Path(parameters["results_dir"]) / parameters["run_name"]
        out.mkdir(parents=True, exist_ok=True)
        record = result or {"score": parameters.get("alpha", 0.5) * parameters["beta"]}
        (out / "tiny.json").write_text(json.dumps(record))

    monkeypatch.setattr(papermill, "execute_notebook", execute_notebook)
    return calls


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: mainlib.sweep is already imported
def test_a_failed_point_makes_the_process_exit_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # old code: exit status 0, and the ok row had no error column (sweep.md showed no error at all)
    fake_papermill(monkeypatch)
    path = sweep_file(tmp_path, grid={"beta": [1, 99]})
    argv = ["mainlib.sweep", str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("mainlib.sweep", run_name="__main__")  # what `python -m mainlib.sweep` runs
    assert exit_.value.code == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 of 2 point(s) failed" in last and "sweep.md" in last
    rows = json.loads((tmp_path / "res" / "s" / "sweep.json").read_text())["rows"]
    assert [(r["status"], r["error"]) for r in rows] == [("ok", ""), ("failed", "AssertionError: beta 99 is refused")]
    assert rows[1]["score"] is None
    table = (tmp_path / "res" / "s" / "sweep.md").read_text()
    assert "| error |" in table and "beta 99 is refused" in table


def test_all_points_ok_exit_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls = fake_papermill(monkeypatch)
    path = sweep_file(tmp_path, parameters={"alpha": 2})
    assert main([str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")]) == 0
    assert "all 2 point(s) ok" in capsys.readouterr().out.strip().splitlines()[-1]
    assert [c["beta"] for c in calls] == [1, 2] and all(c["alpha"] == 2 for c in calls)
    rows = json.loads((tmp_path / "res" / "s" / "sweep.json").read_text())["rows"]
    assert [(r["score"], r["error"]) for r in rows] == [(2, ""), (4, "")]


def test_a_metric_missing_from_the_result_fails_its_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # old code: status ok with None in the column, for every point (a typo in a metric looked like data)
    fake_papermill(monkeypatch, result={"score": 1.0, "counts": {"selected": 3}})
    path = sweep_file(tmp_path, metrics=["score", "counts.selectd"])
    assert main([str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "res")]) == 1
    rows = json.loads((tmp_path / "res" / "s" / "sweep.json").read_text())["rows"]
    assert {r["status"] for r in rows} == {"failed"}
    assert "counts.selectd" in rows[0]["error"] and "counts.selected" in rows[0]["error"]


# ---- 5. evaluation settings, checked before any model loads ------------------------------------------


@pytest.fixture()
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "load_tokenizer", refuse)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(limit=0), r"limit must be an int >= 1 \(documents per task\) or a float in \(0, 1\)"),
        (dict(limit=-3), r"limit must be .*; got -3"),
        (dict(limit=-0.5), r"limit must be .*; got -0\.5"),
        # lm-eval 0.4 runs int(limit) documents when limit >= 1: 1.0 would be one document, 2.5 two
        (dict(limit=1.0), r"limit must be .*lm-eval reads a float >= 1 as int\(limit\) documents; got 1\.0"),
        (dict(limit=2.5), r"limit must be .*; got 2\.5"),
        (dict(limit=True), r"limit must be .*; got True"),
        (dict(limit="5"), r"limit must be .*; got '5'"),
        (dict(limit=float("inf")), r"limit must be .*; got inf"),
        # lm-eval runs num_fewshot < 0 as zero-shot and records it as -1 shots
        (dict(num_fewshot=-1), r"num_fewshot must be an int >= 0 or None; got -1"),
        (dict(num_fewshot=1.5), r"num_fewshot must be an int >= 0 or None; got 1\.5"),
        (dict(batch_size=True), r"batch_size must be an int >= 1 or 'auto'; got True"),
        (dict(max_gen_toks=2.5), r"max_gen_toks must be an int >= 1 or None; got 2\.5"),
        (dict(generation_slots=True), r"generation_slots must be an int >= 0; got True"),
        # numpy refuses a negative seed, inside lm-eval, after the model has loaded
        (dict(seed=-1), r"seed must be an int in \[0, 2\*\*32\); got -1"),
        (dict(headline="acc"), r"headline must be a mapping benchmark -> 'metric,filter'; got 'acc'"),
        (dict(tasks=["mmlu", 3]), r"tasks must be a non-empty list of names; got \['mmlu', 3\]"),
        # papermill -p allow_code_execution false gives the string 'false', which is truthy
        (dict(allow_code_execution="false"), r"allow_code_execution must be True or False; got 'false'"),
    ],
)
def test_bad_evaluation_settings_fail_before_a_model_loads(no_model_loading, setting: dict, message: str) -> None:
    from mainlib.evaluate import evaluate

    settings = {"tasks": ["mmlu"], "data": "bundled", **setting}
    with pytest.raises(ValueError, match=message):
        evaluate("smollm2-135m-instruct", **settings)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--limit", "0"], r"argument --limit: limit must be an int >= 1"),
        (["--limit", "-2"], r"argument --limit: limit must be an int >= 1 .*; got -2"),
        (["--limit", "1.0"], r"argument --limit: limit must be .*; got 1\.0"),
        (["--num-fewshot", "-1"], r"argument --num-fewshot: num_fewshot must be an int >= 0"),
        (["--batch-size", "0"], r"argument --batch-size: batch_size must be an int >= 1 or 'auto'; got 0"),
        (["--seed", "-1"], r"argument --seed: seed must be an int in \[0, 2\*\*32\)"),
    ],
)
def test_cli_settings_are_usage_errors(no_model_loading, capsys, argv: list[str], message: str) -> None:
    # old code: a ValueError traceback (limit 0, batch size 0) or, for the rest, a run that loaded the model
    from mainlib.evaluate import main as evaluate_main

    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["--tasks", "mmlu", "--data", "bundled", *argv])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_good_limits_pass() -> None:
    from mainlib.evaluate import EvalSettings

    assert EvalSettings(limit=1).limit == 1 and EvalSettings(limit=0.25).limit == 0.25
    assert EvalSettings(limit=None, num_fewshot=0, seed=0).num_fewshot == 0
