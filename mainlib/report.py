"""The summary of one or more runs: every notebook's JSON under `results/<run_name>/` turned into one
Markdown table file (`summary.md`) and the figures notebook 06 shows (drawn by `mainlib.plots`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mainlib import plots
from mainlib.results import markdown_table

NOTEBOOK_RESULTS = ("01_forward_reverse", "02_synthesize", "03_mutual_filter", "04_musc", "05_evaluate")


def load_run(results_dir: str | Path, run_name: str) -> dict[str, dict[str, Any]]:
    """The notebooks' JSON of one run, by notebook name (those that exist)."""
    folder = Path(results_dir) / run_name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: run the notebooks with run_name={run_name!r} first")
    return {
        name: json.loads((folder / f"{name}.json").read_text())
        for name in NOTEBOOK_RESULTS
        if (folder / f"{name}.json").is_file()
    }


def benchmark_rows(runs: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """05's rows of every run; with several runs, the label says which run a model comes from."""
    rows = []
    for run, records in runs.items():
        for r in records.get("05_evaluate", {}).get("rows", []):
            rows.append({**r, "label": f"{run}: {r['label']}" if len(runs) > 1 else r["label"]})
    return rows


def main_funnel(record: dict[str, Any]) -> list[tuple[str, int]]:
    """MAIN's pool → synthesized → selected (from 03's counts)."""
    counts = record["counts"]
    return [
        ("unlabeled pool", counts["synthesize"]["pool"]),
        ("instruction written", counts["synthesize"]["kept"]),
        ("selected by the filter", counts["select"]["selected"]),
    ]


def musc_funnel(record: dict[str, Any]) -> list[tuple[str, int]]:
    return [(row["step"], row["left"]) for row in record["survival"]]


def training_rows(run: str, records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Start and end of each training curve of one run: seed SFTs (quarter means), final SFT, DPO."""
    rows = []
    if "01_forward_reverse" in records:
        for direction, s in records["01_forward_reverse"]["loss_summary"].items():
            start, end = s["first_quarter_mean"], s["last_quarter_mean"]
            rows.append({"run": run, "stage": f"01 seed SFT ({direction})", "start": start, "end": end})
    if "03_mutual_filter" in records and records["03_mutual_filter"].get("final_losses"):
        losses = [r["loss"] for r in records["03_mutual_filter"]["final_losses"]]
        rows.append({"run": run, "stage": "03 final SFT (loss)", "start": losses[0], "end": losses[-1]})
    if "04_musc" in records:
        log, final = records["04_musc"]["training_log"], records["04_musc"]["final_metrics"]
        rows.append(
            {"run": run, "stage": "04 token-weighted DPO (loss)", "start": log[0]["loss"], "end": final["loss"]}
        )
        accuracy = {"start": log[0].get("rewards/accuracies"), "end": final["rewards/accuracies"]}
        rows.append({"run": run, "stage": "04 reward accuracy", **accuracy})
    for row in rows:
        row.update({k: round(row[k], 4) for k in ("start", "end") if isinstance(row[k], float)})
    return rows


def funnel_sections(run: str, records: dict[str, dict[str, Any]]) -> list[str]:
    """MAIN's filtering funnel (with the ground-truth AUC) and MuSC's survival, for one run."""
    parts = []
    if "03_mutual_filter" in records:
        record = records["03_mutual_filter"]
        table = markdown_table([{"step": s, "left": n} for s, n in main_funnel(record)])
        parts += [f"## MAIN filtering ({run})", "", table, ""]
        auc = {k: round(v, 3) for k, v in record.get("ground_truth_auc", {}).items() if k != "n_pairs"}
        if auc:
            n_pairs = record["ground_truth_auc"].get("n_pairs")
            listed = ", ".join(f"{k} {v}" for k, v in auc.items())
            parts += [f"Ground-truth ROC-AUC on {n_pairs} held-out pairs: {listed}", ""]
    if "04_musc" in records:
        table = markdown_table([{"step": s, "left": n} for s, n in musc_funnel(records["04_musc"])])
        parts += [f"## MuSC survival ({run})", "", table, ""]
    return parts


def summary_markdown(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Benchmarks, MAIN filtering, MuSC survival and training end points, as Markdown tables."""
    from mainlib.evaluate import headline_table

    parts = [f"# Summary: {', '.join(runs)}", ""]
    rows = benchmark_rows(runs)
    if rows:
        parts += ["## Benchmarks (headline metric ± stderr)", "", markdown_table(headline_table(rows)), ""]
    training = [row for run, records in runs.items() for row in training_rows(run, records)]
    if training:
        title = "## Training (start → end; SFT losses are quarter means, DPO the mean of the last 3 steps)"
        parts += [title, "", markdown_table(training), ""]
    for run, records in runs.items():
        parts += funnel_sections(run, records)
    return "\n".join(parts)


def figures(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Figure]:
    """Every figure of the summary, by file name (without extension)."""
    out: dict[str, Figure] = {}
    rows = benchmark_rows(runs)
    if rows:
        out["06_benchmarks"] = plots.benchmark_bars(rows, title="benchmarks (headline metric, ±1 stderr)")
    for run, records in runs.items():
        prefix = f"06_{run}_" if len(runs) > 1 else "06_"
        curves = {}
        if "01_forward_reverse" in records:
            curves |= {f"seed {d}": rows for d, rows in records["01_forward_reverse"]["losses"].items()}
        if "03_mutual_filter" in records and records["03_mutual_filter"].get("final_losses"):
            curves["final (seed ∪ selected)"] = records["03_mutual_filter"]["final_losses"]
        if curves:
            out[f"{prefix}sft_curves"] = plots.loss_curves(curves, title="SFT")
        if "04_musc" in records:
            out[f"{prefix}dpo_curves"] = plots.dpo_curves(records["04_musc"]["training_log"])
            out[f"{prefix}musc_survival"] = plots.funnel(
                musc_funnel(records["04_musc"]), "MuSC: instructions left after each step"
            )
        if "03_mutual_filter" in records:
            out[f"{prefix}main_filtering"] = plots.funnel(
                main_funnel(records["03_mutual_filter"]), "MAIN: pairs left after each step"
            )
    return out


def write_summary(
    results_dir: str | Path, run_names: Sequence[str], out_run: str | None = None
) -> tuple[Path, list[Path]]:
    """`results/<out_run>/summary.md` and `results/<out_run>/figures/06_*.{png,pdf}`; returns their paths."""
    runs = {name: load_run(results_dir, name) for name in run_names}
    target = Path(results_dir) / (out_run or run_names[0])
    target.mkdir(parents=True, exist_ok=True)
    summary = target / "summary.md"
    summary.write_text(summary_markdown(runs), encoding="utf-8")
    paths = []
    for name, fig in figures(runs).items():
        paths += plots.save_figure(fig, target / "figures", name)
    return summary, paths
