"""Notebooks execute under papermill with the tiny model, and record the numbers they claim."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, out_dir: Path, **parameters) -> dict:
    """Execute a notebook; fail on any error output; return its executed cells."""
    output = out_dir / name
    pm.execute_notebook(
        str(NOTEBOOKS / name),
        str(output),
        parameters=parameters,
        cwd=str(NOTEBOOKS),
        kernel_name="python3",
        progress_bar=False,
    )
    executed = nbformat.read(output, as_version=4)
    assert not [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    return executed


def test_every_notebook_has_a_parameters_cell() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, path.name
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), f"{path.name}: clear outputs"


@pytest.mark.slow
def test_notebook_01_forward_reverse(tiny_params: dict, tmp_path: Path) -> None:
    run_notebook("01_forward_reverse.ipynb", tmp_path, **tiny_params)
    record = json.loads((tmp_path / "results" / "tiny" / "01_forward_reverse.json").read_text())
    assert {"config", "counts", "losses", "loss_summary", "timings", "generations", "provenance"} <= set(record)
    assert record["config"]["n_seed"] == 4 and record["counts"]["train_pairs"] == 4
    assert record["counts"]["clean"]["total"] == 200
    assert set(record["counts"]["clean"]["dropped"]) == {"empty_instruction", "empty_response", "duplicate", "too_long"}
    for direction in ("forward", "reverse"):
        assert len(record["losses"][direction]) == 8
        summary = record["loss_summary"][direction]
        assert summary["last_quarter_mean"] < summary["first_quarter_mean"], record["losses"][direction]
        assert len(record["generations"][direction]) == 3
    assert record["provenance"]["versions"]["trl"] != "not installed"
    assert (tmp_path / "results" / "tiny" / "figures" / "01_loss_curves.png").stat().st_size > 10_000
    assert (tmp_path / "runs" / "tiny" / "init_sft" / "reverse" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_notebooks_02_then_03_resume(tiny_params: dict, tmp_path: Path) -> None:
    run_notebook("02_synthesize.ipynb", tmp_path, **tiny_params)
    synth = json.loads((tmp_path / "results" / "tiny" / "02_synthesize.json").read_text())
    assert synth["alphas"] == [0.1]
    counts = synth["counts"]["synthesis"]
    assert counts["pool"] == 4 and counts["kept"] + sum(counts["dropped"].values()) == 4
    assert synth["losses"]["round 0 forward"] and len(synth["examples"]) == 4
    init_manifest = (tmp_path / "runs" / "tiny" / "init_sft" / "manifest.json").stat().st_mtime_ns

    executed = run_notebook("03_mutual_filter.ipynb", tmp_path, n_auc=4, **tiny_params)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "stages computed now: ['score', 'select', 'final_sft']" in text  # 02's stages were reused
    assert (tmp_path / "runs" / "tiny" / "init_sft" / "manifest.json").stat().st_mtime_ns == init_manifest
    record = json.loads((tmp_path / "results" / "tiny" / "03_mutual_filter.json").read_text())
    assert len(record["scores"]["s_f"]) == counts["kept"] and len(record["scores"]["kept"]) >= 1
    assert record["counts"]["select"]["selected"] == len(record["scores"]["kept"])
    auc = record["ground_truth_auc"]
    assert auc["n_pairs"] == 4 and all(0.0 <= auc[k] <= 1.0 for k in auc if k != "n_pairs")
    assert record["final_losses"]
    for name in ("03_score_histograms", "03_score_scatter", "03_final_sft_loss", "02_round_losses"):
        assert (tmp_path / "results" / "tiny" / "figures" / f"{name}.png").is_file()


@pytest.mark.slow
def test_notebooks_04_then_05_then_06(tiny_model_dir: Path, tmp_path: Path) -> None:
    """MuSC, then base vs MuSC on the offline benchmarks, then the summary.

    The tiny model cannot decompose, so 04 uses the file's own constraints and the template recombination."""
    params = dict(
        run_name="tiny",
        model=str(tiny_model_dir),
        n=6,
        decompose="given",
        recombine="template",
        response_max_new_tokens=24,
        drop_unfinished=False,
        learning_rate=1e-3,
        epochs=2.0,
        batch_size=3,
        max_length=256,
        runs_dir=str(tmp_path / "runs"),
        results_dir=str(tmp_path / "results"),
    )
    run_notebook("04_musc.ipynb", tmp_path, **params)
    record = json.loads((tmp_path / "results" / "tiny" / "04_musc.json").read_text())
    survival = {row["step"]: row["left"] for row in record["survival"]}
    assert survival["instructions"] == 6 and survival["tdpo"] == survival["respond"] > 0
    assert record["config"]["weights"]["mode"] == "kl" and record["config"]["dpo"]["beta"] == 0.1
    log = record["training_log"]
    steps = 2 * -(-survival["respond"] // 3)
    assert len(log) == steps and log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # fresh adapter = reference
    assert 0.0 <= record["final_metrics"]["rewards/accuracies"] <= 1.0
    example = record["example"]
    assert example["prompt"] != example["noised_prompt"] and example["corruption"]
    assert all(c["index"] > 0 for c in example["corruption"])
    figures = tmp_path / "results" / "tiny" / "figures"
    assert (figures / "04_token_weights.png").stat().st_size > 10_000
    assert (figures / "04_dpo_curves.png").stat().st_size > 10_000
    assert (tmp_path / "runs" / "tiny" / "musc" / "tdpo" / "model" / "adapter_model.safetensors").is_file()

    adapter = tmp_path / "runs" / "tiny" / "musc" / "tdpo" / "model"
    executed = run_notebook(
        "05_evaluate.ipynb",
        tmp_path,
        run_name="tiny",
        model=str(tiny_model_dir),
        adapters={
            "base": None,
            "MuSC": str(adapter),
            "MAIN": str(tmp_path / "runs" / "tiny" / "final_sft" / "forward"),
        },
        limit=2,
        batch_size=2,
        max_gen_toks=8,
        quantization="none",
        results_dir=str(tmp_path / "results"),
    )
    text = "".join(
        str(o.get("text", "")) + str(o.get("data", "")) for c in executed.cells for o in c.get("outputs", [])
    )
    assert (
        "HumanEval skipped" in text and "[MAIN] skipped" in text and "no such folder" in text
    )  # no opt-in; 03 was not run here
    evaluation = json.loads((tmp_path / "results" / "tiny" / "05_evaluate.json").read_text())
    assert [row["model"] for row in evaluation["table"]] == ["base", "MuSC"]
    headline = [r for r in evaluation["rows"] if r["headline"]]
    assert {(r["label"], r["benchmark"]) for r in headline} == {
        (label, b) for label in ("base", "MuSC") for b in ("mmlu", "gsm8k", "ifeval")
    }
    assert all(0.0 <= r["value"] <= 1.0 for r in evaluation["rows"])
    assert {r["n"] for r in headline if r["benchmark"] == "gsm8k"} == {2}
    names = sorted(p.name for p in (tmp_path / "results" / "tiny" / "eval").glob("*.json"))
    assert len(names) == 6 and "musc_tdpo_model__gsm8k.json" in names  # 2 models x 3 tasks, visible names

    run_notebook("06_figures.ipynb", tmp_path, run_name="tiny", results_dir=str(tmp_path / "results"))
    summary = (tmp_path / "results" / "tiny" / "summary.md").read_text()
    assert "## Benchmarks" in summary and "| MuSC |" in summary and "## MuSC survival (tiny)" in summary
    for name in ("06_benchmarks", "06_dpo_curves", "06_musc_survival"):
        assert (figures / f"{name}.png").stat().st_size > 10_000 and (figures / f"{name}.pdf").is_file()


@pytest.mark.slow
@pytest.mark.heavy  # seven kernels; 01-06 are each executed by the tests above (make test-all)
def test_quickstart_runs_01_to_06(tiny_params: dict, tiny_model_dir: Path, tmp_path: Path) -> None:
    main_overrides = {k: v for k, v in tiny_params.items() if k not in ("run_name", "model", "runs_dir", "results_dir")}
    executed = run_notebook(
        "00_quickstart.ipynb",
        tmp_path,
        run_name="qs",
        model=str(tiny_model_dir),
        quantization="none",
        main_overrides=main_overrides,
        musc_overrides=dict(
            n=4, decompose="given", recombine="template", response_max_new_tokens=16, drop_unfinished=False
        ),
        eval_limit=2,
        eval_max_gen_toks=8,
        eval_batch_size=2,
        eval_overrides={"tasks": ["mmlu", "humaneval"]},
        runs_dir=str(tmp_path / "runs"),
        results_dir=str(tmp_path / "results"),
    )
    results = tmp_path / "results" / "qs"
    timings = json.loads((results / "00_quickstart.json").read_text())["timings"]
    assert set(timings) == {
        "01_forward_reverse",
        "02_synthesize",
        "03_mutual_filter",
        "04_musc",
        "05_evaluate",
        "06_figures",
        "total_s",
    }
    evaluation = json.loads((results / "05_evaluate.json").read_text())
    assert [row["model"] for row in evaluation["table"]] == ["base", "MAIN", "MuSC"]
    assert {r["benchmark"] for r in evaluation["rows"] if r["headline"]} == {"mmlu", "humaneval"}
    summary = (results / "summary.md").read_text()
    assert "## MAIN filtering (qs)" in summary and "## MuSC survival (qs)" in summary
    assert any(o.get("output_type") == "display_data" for o in executed.cells[-1].outputs)  # the figure
