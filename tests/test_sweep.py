"""Sweeps: a grid of notebook runs with papermill; a failing point is recorded, the others still run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mainlib.sweep import SweepSpec, lookup, main

REPO = Path(__file__).resolve().parents[1]


def test_lookup_and_spec_errors(tmp_path: Path) -> None:
    record = {"a": {"b": [1, {"c": 3}]}, "losses": [{"loss": 2.0}, {"loss": 1.0}]}
    assert lookup(record, "a.b.1.c") == 3 and lookup(record, "losses.-1.loss") == 1.0
    assert lookup(record, "a.x") is None and lookup(record, "losses.5.loss") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "notebook": "nope.ipynb", "grid": {"a": [1]}}))
    with pytest.raises(ValueError, match="missing field"):
        SweepSpec.from_file(bad)
    bad.write_text(yaml.safe_dump({"name": "x", "notebook": "nope.ipynb", "result": "r", "grid": {"a": []}}))
    with pytest.raises(ValueError, match=r"grid\.a must be a non-empty list"):
        SweepSpec.from_file(bad)
    spec = {"name": "x", "notebook": str(REPO / "notebooks" / "03_mutual_filter.ipynb"), "result": "r"}
    bad.write_text(yaml.safe_dump({**spec, "parameters": {"n_auc": 4}, "grid": {"top_fractoin": [0.5]}}))
    with pytest.raises(
        ValueError,
        match=r"grid\.top_fractoin: 03_mutual_filter\.ipynb has no parameter top_fractoin \(did you mean top_fraction",
    ):
        SweepSpec.from_file(bad)  # a misspelled name would otherwise run every point with the default
    shipped = SweepSpec.from_file(REPO / "sweeps" / "alpha_x_filter.yaml")
    assert len(shipped.points()) == 4 and Path(shipped.notebook).is_file()


@pytest.mark.slow
def test_two_points_and_a_failing_one(tiny_params: dict, tmp_path: Path) -> None:
    fixed = {
        k: v for k, v in tiny_params.items() if k not in ("run_name", "runs_dir", "results_dir", "round_learning_rate")
    }
    spec = {
        "name": "tinysweep",
        "notebook": str(REPO / "notebooks" / "03_mutual_filter.ipynb"),
        "result": "03_mutual_filter",
        "parameters": {**fixed, "epochs": 4.0, "round_max_new_tokens": 32, "n_auc": 4},
        "grid": {"top_fraction": [0.5, 1.0, 7.0]},  # 7.0 is not a fraction: that point fails
        "metrics": ["counts.select.selected", "final_losses.-1.loss"],
        "plot": {"x": "top_fraction", "y": "final_losses.-1.loss"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    main([str(path), "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")])
    out = tmp_path / "results" / "tinysweep"
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "top_fraction" in rows[2]["error"]
    assert rows[0]["counts.select.selected"] <= rows[1]["counts.select.selected"]
    assert all(isinstance(r["final_losses.-1.loss"], float) for r in rows[:2])
    assert (out / "sweep.png").stat().st_size > 10_000 and "| failed |" in (out / "sweep.md").read_text()
    assert len(list((tmp_path / "runs" / "tinysweep" / "notebooks").glob("*.ipynb"))) == 3
