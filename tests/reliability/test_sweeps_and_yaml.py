"""Issue 13: sweeps fail loudly and before the first point, YAML numbers are numbers, evaluation settings
are checked before a model loads. Fast: no model, and papermill is replaced by a fake that writes the JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
import yaml

from mainlib.sweep import SweepSpec

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
