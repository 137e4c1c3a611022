"""Notebooks execute under papermill with the tiny model, and record the numbers they claim."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, out_dir: Path, **parameters) -> Path:
    output = out_dir / name
    pm.execute_notebook(
        str(NOTEBOOKS / name),
        str(output),
        parameters=parameters,
        cwd=str(NOTEBOOKS),
        kernel_name="python3",
        progress_bar=False,
    )
    return output


def test_every_notebook_has_a_parameters_cell() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, path.name
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), f"{path.name}: clear outputs"


@pytest.mark.slow
def test_notebook_01_forward_reverse(tiny_model_dir: Path, tmp_path: Path) -> None:
    output = run_notebook(
        "01_forward_reverse.ipynb",
        tmp_path,
        run_name="tiny",
        model=str(tiny_model_dir),
        n_seed=4,
        n_show=2,
        epochs=8.0,
        batch_size=4,
        learning_rate=0.02,
        lora_dropout=0.0,
        max_length=128,
        max_new_tokens=8,
        results_dir=str(tmp_path / "results"),
        output_dir=str(tmp_path / "runs"),
    )
    record = json.loads((tmp_path / "results" / "tiny" / "01_forward_reverse.json").read_text())
    assert {"config", "counts", "losses", "loss_summary", "timings", "generations", "provenance"} <= set(record)
    assert record["config"]["n_seed"] == 4 and record["counts"]["train_pairs"] == 4
    assert record["counts"]["clean"]["total"] == 200 and set(record["counts"]["clean"]["dropped"]) == {
        "empty_instruction",
        "empty_response",
        "duplicate",
        "too_long",
    }
    for direction in ("forward", "reverse"):
        losses = [row["loss"] for row in record["losses"][direction]]
        assert len(losses) == 8
        summary = record["loss_summary"][direction]
        assert summary["last_quarter_mean"] < summary["first_quarter_mean"], losses
        assert len(record["generations"][direction]) == 2
    assert record["provenance"]["versions"]["trl"] != "not installed"
    assert (tmp_path / "results" / "tiny" / "figures" / "01_loss_curves.png").stat().st_size > 10_000
    assert (tmp_path / "runs" / "tiny" / "reverse" / "adapter_model.safetensors").is_file()
    executed = nbformat.read(output, as_version=4)
    assert not [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
