"""Parameter sweeps: one notebook over a grid of parameters with papermill, then one table and one plot.

    python -m mainlib.sweep sweeps/alpha_x_filter.yaml

The YAML file:

    name: alpha_x_filter                 # results/<name>/ gets sweep.json, sweep.md, sweep.png|pdf
    notebook: notebooks/03_mutual_filter.ipynb
    result: 03_mutual_filter             # the JSON each point's notebook writes, to read the metrics from
    parameters: {n_seed: 16}             # the same for every point
    grid: {alpha_end: [0.2, 0.5], top_fraction: [0.25, 0.5]}   # the Cartesian product is run
    metrics: [ground_truth_auc.mutual_pmi, counts.select.selected]   # dotted paths into that JSON
    plot: {x: top_fraction, y: counts.select.selected, hue: alpha_end}

Every point runs in the same run directory (`runs/<name>/`), so stages a point does not change are reused
(sorted points change as little as possible from one to the next), and writes its JSON to its own
`results/<name>/points/<k>/`. Each executed notebook is kept in `runs/<name>/notebooks/`. A point that
fails is recorded with its error, and the others still run.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import re
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mainlib.results import markdown_table, write_json
from mainlib.yamlfile import load_yaml


@dataclass
class SweepSpec:
    name: str
    notebook: str
    result: str
    grid: dict[str, list[Any]]
    parameters: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    plot: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> SweepSpec:
        path = Path(path)
        raw = load_yaml(path) or {}
        missing = [k for k in ("name", "notebook", "result", "grid") if k not in raw]
        if missing:
            raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(raw) - {"name", "notebook", "result", "grid", "parameters", "metrics", "plot"})
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
        for key, values in raw["grid"].items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: grid.{key} must be a non-empty list")
        notebook = Path(raw["notebook"])
        if not notebook.is_file() and (path.parent / notebook).is_file():
            notebook = path.parent / notebook  # relative to the sweep file
        if not notebook.is_file():
            raise FileNotFoundError(f"{path}: notebook {raw['notebook']} not found")
        check_names(path, notebook, [*raw.get("parameters", {}), *raw["grid"]])
        return cls(**{**raw, "notebook": str(notebook)})

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(self.grid[k] for k in keys))]


def notebook_names(notebook: str | Path) -> set[str] | None:
    """The parameters a notebook reads: its parameters cell, and the flat names of the config it builds with
    `from_notebook(<Config>, globals(), ...)`; None when it builds none (then any name may be meant)."""
    from mainlib.config import CONFIGS
    from mainlib.parameters import flat_parameters

    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    built = re.search(r"from_notebook\(\s*(\w+)", code)
    classes = {cls.__name__: cls for cls in CONFIGS.values()}
    if not built or built.group(1) not in classes:
        return None
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assigned = set(re.findall(r"^(\w+)\s*=", "".join(cell["source"]), re.MULTILINE))
    return assigned | set(flat_parameters(classes[built.group(1)])) | {"recipe"}


def check_names(path: Path, notebook: Path, names: Sequence[str]) -> None:
    """A sweep name the notebook does not read would run every point with the default: fail before any runs."""
    known = notebook_names(notebook)
    unknown = sorted(set(names) - known) if known is not None else []
    if unknown:
        hints = [f"{n} (did you mean {', '.join(difflib.get_close_matches(n, sorted(known), n=2))}?)" for n in unknown]
        raise ValueError(f"{path}: {notebook.name} has no parameter(s) {'; '.join(hints)}")


def lookup(record: Mapping[str, Any], dotted: str) -> Any:
    """`a.b.c` in nested dicts, with integer parts indexing lists (`final_losses.-1.loss`); None if missing."""
    value: Any = record
    for part in dotted.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def execute(notebook: str | Path, output: str | Path, parameters: dict[str, Any]) -> None:
    """Run a notebook with papermill in its own folder (so its relative paths work)."""
    import papermill as pm

    pm.execute_notebook(
        str(notebook),
        str(output),
        parameters=parameters,
        cwd=str(Path(notebook).resolve().parent),
        kernel_name="python3",
        progress_bar=False,
    )


def run_sweep(
    spec: SweepSpec, runs_dir: str | Path = "runs", results_dir: str | Path = "results"
) -> list[dict[str, Any]]:
    """Run every grid point (failures recorded, not fatal); write and return one row per point."""
    runs_dir, results_dir = Path(runs_dir).resolve(), Path(results_dir).resolve()
    notebooks_dir = runs_dir / spec.name / "notebooks"
    notebooks_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, point in enumerate(spec.points()):
        point_results = results_dir / spec.name / "points" / f"{k:02d}"
        parameters = {
            **spec.parameters,
            **point,
            "run_name": spec.name,
            "runs_dir": str(runs_dir),
            "results_dir": str(point_results),
        }
        print(f"[sweep {spec.name}] point {k + 1}/{len(spec.points())}: {point}")
        start = time.perf_counter()
        row: dict[str, Any] = {"point": k, **point}
        try:
            execute(spec.notebook, notebooks_dir / f"{k:02d}_{Path(spec.notebook).name}", parameters)
            record = json.loads((point_results / spec.name / f"{spec.result}.json").read_text())
            row |= {"status": "ok", **{m: lookup(record, m) for m in spec.metrics}}
        except Exception as e:  # a failed point is a result too; the others still run
            message = str(e).strip().splitlines()
            row |= {"status": "failed", "error": (message[-1] if message else type(e).__name__)[:300]}
            print(f"[sweep {spec.name}] point {k} failed:\n{traceback.format_exc(limit=2)}")
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
    write_summary(spec, rows, results_dir / spec.name)
    return rows


def plot_sweep(spec: SweepSpec, rows: Sequence[Mapping[str, Any]]):
    """`y` against `x`, one line per `hue` value, over the points that succeeded."""
    import matplotlib.pyplot as plt

    x, y, hue = spec.plot.get("x"), spec.plot.get("y"), spec.plot.get("hue")
    ok = [r for r in rows if r["status"] == "ok" and r.get(y) is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for value in dict.fromkeys(r.get(hue) for r in ok) if hue else [None]:
        line = sorted((r[x], r[y]) for r in ok if not hue or r.get(hue) == value)
        if line:
            ax.plot(*zip(*line, strict=True), marker="o", label=f"{hue} = {value}" if hue else None)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    failed = len(rows) - len([r for r in rows if r["status"] == "ok"])
    ax.set_title(f"sweep {spec.name}" + (f" ({failed} failed point(s) not shown)" if failed else ""))
    ax.grid(alpha=0.3)
    if hue:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_summary(spec: SweepSpec, rows: Sequence[Mapping[str, Any]], out: Path) -> None:
    from mainlib.plots import save_figure

    write_json(out / "sweep.json", {"spec": spec.__dict__, "rows": list(rows)})
    (out / "sweep.md").write_text(f"# Sweep {spec.name}\n\n{markdown_table(list(rows))}\n", encoding="utf-8")
    if spec.plot:
        save_figure(plot_sweep(spec, rows), out, "sweep")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mainlib.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="the sweep YAML file")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--results-dir", default="results")
    args = parser.parse_args(argv)
    rows = run_sweep(SweepSpec.from_file(args.spec), args.runs_dir, args.results_dir)
    print(markdown_table(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} of {len(rows)} point(s) failed; see the table")


if __name__ == "__main__":
    main()
