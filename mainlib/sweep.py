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
fails (or whose JSON lacks a metric) is recorded with its error in the `error` column, the others still run,
and the command exits with status 1. The sweep file is checked before the first point: its fields, and that
the notebook reads every name it sets (its parameters cell, or the config it builds); exit status 2 if not.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import itertools
import json
import re
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from mainlib.results import markdown_table, write_json
from mainlib.yamlfile import load_yaml

FIELDS = ("name", "notebook", "result", "grid", "parameters", "metrics", "plot")
SET_BY_SWEEP = ("run_name", "runs_dir", "results_dir")  # every point gets its own; a sweep file may not set them
ROW_COLUMNS = ("point", "status", "seconds", "error")  # the table's own columns, besides the grid and metrics
PLOT_KEYS = ("x", "y", "hue")


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
        """Read and check a sweep file: every mistake is a ValueError naming the file, before any point runs."""
        path = Path(path)
        raw = load_yaml(path)
        check_fields(path, raw)
        raw = {**raw, "parameters": raw.get("parameters") or {}, "metrics": raw.get("metrics") or []}
        raw["plot"] = raw.get("plot") or {}
        check_columns(path, raw)
        notebook = Path(raw["notebook"])
        if not notebook.is_file() and (path.parent / notebook).is_file():
            notebook = path.parent / notebook  # relative to the sweep file
        if not notebook.is_file():
            raise FileNotFoundError(f"{path}: notebook {raw['notebook']} not found")
        check_names(path, notebook, raw["parameters"], raw["grid"])
        return cls(**{**raw, "notebook": str(notebook)})

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(self.grid[k] for k in keys))]


def _fail(path: Path, problem: str) -> NoReturn:
    raise ValueError(f"{path}: {problem}")


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=2)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def check_fields(path: Path, raw: Any) -> None:
    """Each field's type, so a wrong shape is named here and not met as a TypeError halfway through a sweep."""
    if not isinstance(raw, dict):
        _fail(path, f"a sweep file is a mapping of fields {', '.join(FIELDS)}; got {type(raw).__name__}")
    if missing := [k for k in FIELDS[:4] if k not in raw]:
        _fail(path, f"missing field(s) {', '.join(missing)}")
    if unknown := [f"{k}{_did_you_mean(str(k), FIELDS)}" for k in raw if k not in FIELDS]:
        _fail(path, f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    name, metrics = raw["name"], raw.get("metrics") or []
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        _fail(path, f"name must be a folder name (letters, digits, _ . -) for runs/<name>/; got {name!r}")
    for key in ("notebook", "result"):
        if not isinstance(raw[key], str) or not raw[key]:
            _fail(path, f"{key} must be a path (result: the JSON each point writes, without .json); got {raw[key]!r}")
    check_grid(path, raw["grid"])
    if not isinstance(raw.get("parameters") or {}, dict):
        _fail(
            path, f"parameters must be a mapping of parameter -> value, like {{n_seed: 16}}; got {raw['parameters']!r}"
        )
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        _fail(
            path, f"metrics must be a list of dotted paths into the result JSON, like [counts.total]; got {metrics!r}"
        )


def check_grid(path: Path, grid: Any) -> None:
    """A mapping of parameter -> non-empty list: the Cartesian product of the lists is run."""
    if not isinstance(grid, dict) or not grid:
        like = "with at least one parameter, like {alpha_end: [0.2, 0.5]}"
        _fail(path, f"grid must be a mapping of parameter -> list of values {like}; got {grid!r}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            _fail(path, f"grid.{key} must be a non-empty list of values, like [0.2, 0.5]; got {values!r}")


def check_columns(path: Path, raw: Mapping[str, Any]) -> None:
    """Grid names and metrics are the table's columns: distinct, and the only names `plot` may use."""
    columns = [*map(str, raw["grid"]), *raw["metrics"]]
    if clash := sorted({c for c in columns if columns.count(c) > 1 or c in ROW_COLUMNS}):
        _fail(path, f"{', '.join(clash)}: a column twice (grid, metrics, the table's {', '.join(ROW_COLUMNS)})")
    plot, allowed = raw["plot"], [*columns, "seconds"]
    if not isinstance(plot, dict) or not set(plot) <= set(PLOT_KEYS):
        got = ", ".join(map(str, set(plot) - set(PLOT_KEYS))) if isinstance(plot, dict) else repr(plot)
        _fail(path, f"plot keys are {', '.join(PLOT_KEYS)}; got {got}")
    if plot and not {"x", "y"} <= set(plot):
        _fail(path, f"plot needs x and y (hue is optional); got {plot!r}")
    for key, value in plot.items():
        if value not in allowed:
            hint = _did_you_mean(str(value), allowed)
            _fail(path, f"plot.{key}: {value!r} is not a column{hint}; allowed: {', '.join(allowed)}")


def assigned_names(source: str) -> set[str]:
    """The names a parameters cell assigns at top level (`a = 1`, `b: int = 2`): what papermill can set."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # an IPython magic: read it line by line
        return set(re.findall(r"^(\w+)\s*(?::[^=\n]*)?=(?!=)", source, re.MULTILINE))
    targets = [t for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
    targets += [node.target for node in tree.body if isinstance(node, ast.AnnAssign)]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def notebook_names(notebook: str | Path) -> set[str] | None:
    """The parameters a notebook reads: what its parameters cell assigns (papermill only logs other names),
    plus the flat names of the config it builds with `from_notebook(<Config>, globals(), ...)`; None when it
    has no parameters cell (papermill would put the values above the notebook's own, which overwrite them)."""
    from mainlib.config import CONFIGS
    from mainlib.parameters import flat_parameters

    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return None
    names = assigned_names("".join(cell["source"]))
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    built = re.search(r"from_notebook\(\s*(\w+)", code)
    classes = {cls.__name__: cls for cls in CONFIGS.values()}
    if built and built.group(1) in classes:
        names |= set(flat_parameters(classes[built.group(1)])) | {"recipe"}
    return names


def check_names(path: Path, notebook: Path, parameters: Mapping[str, Any], grid: Mapping[str, Any]) -> None:
    """A name the notebook does not read would run every point with its default (papermill only logs it), and
    a name set twice would be silently overridden: fail before any point runs, naming each."""
    known = notebook_names(notebook)
    if known is None:
        _fail(path, f"{notebook.name} has no cell tagged `parameters`: papermill would put the values above the "
                    "notebook's own assignments, which overwrite them; tag the cell that assigns them")  # fmt: skip
    both = sorted(set(map(str, parameters)) & set(map(str, grid)))
    problems = [f"{', '.join(both)} is in both parameters and grid: give each name once"] if both else []
    for section, names in (("parameters", parameters), ("grid", grid)):
        for name in map(str, names):
            if name in SET_BY_SWEEP:
                problems.append(f"{section}.{name}: set by the sweep for each point (name, --runs-dir, --results-dir)")
            elif name not in known:
                hint = _did_you_mean(name, known)
                problems.append(f"{section}.{name}: {notebook.name} has no parameter {name}{hint}")
    if problems:
        _fail(path, "; ".join(problems))


MISSING: Any = object()


def lookup(record: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """`a.b.c` in nested dicts, with integer parts indexing lists (`final_losses.-1.loss`); `default` if missing."""
    value: Any = record
    for part in dotted.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return default
    return value


def dotted_paths(record: Any, prefix: str = "") -> list[str]:
    """Every `a.b.c` path through the nested dicts of `record`: the names a missing metric is matched against."""
    if not isinstance(record, Mapping):
        return []
    return [p for k, v in record.items() for p in (f"{prefix}{k}", *dotted_paths(v, f"{prefix}{k}."))]


def read_metrics(path: Path, metrics: Sequence[str]) -> dict[str, Any]:
    """The metrics of one point's result JSON; a path not in it fails the point (a typo would read as None)."""
    record = json.loads(path.read_text(encoding="utf-8"))
    values = {m: lookup(record, m, MISSING) for m in metrics}
    if missing := [m for m, v in values.items() if v is MISSING]:
        hints = [f"{m}{_did_you_mean(m, dotted_paths(record))}" for m in missing]
        raise KeyError(f"no metric {', '.join(hints)} in {path.name}")
    return values


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
    """Run every grid point (failures recorded, not fatal); write and return one row per point, each with the
    same columns: the point, status, metrics (None where failed), seconds, error ("" where ok)."""
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
        row: dict[str, Any] = {"point": k, **point, "status": "ok", **dict.fromkeys(spec.metrics)}
        row |= {"seconds": None, "error": ""}
        try:
            execute(spec.notebook, notebooks_dir / f"{k:02d}_{Path(spec.notebook).name}", parameters)
            row |= read_metrics(point_results / spec.name / f"{spec.result}.json", spec.metrics)
        except Exception as e:  # a failed point is a result too; the others still run
            row |= {"status": "failed", "error": last_line(e)}
            print(f"[sweep {spec.name}] point {k} failed:\n{traceback.format_exc(limit=2)}")
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
    write_summary(spec, rows, results_dir / spec.name)
    return rows


def last_line(error: BaseException) -> str:
    """The line of an error that says what went wrong (papermill's ends with the notebook's exception)."""
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])[:300]  # str(KeyError) would add quotes
    lines = str(error).strip().splitlines()
    return (lines[-1] if lines else type(error).__name__)[:300]


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run a sweep file; the exit status is 1 when a point failed (2: the sweep file is wrong, nothing ran)."""
    parser = argparse.ArgumentParser(prog="python -m mainlib.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="the sweep YAML file")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--results-dir", default="results")
    args = parser.parse_args(argv)
    try:
        spec = SweepSpec.from_file(args.spec)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    rows = run_sweep(spec, args.runs_dir, args.results_dir)
    print(markdown_table(rows))
    table, failed = Path(args.results_dir) / spec.name / "sweep.md", sum(r["status"] != "ok" for r in rows)
    if failed:
        print(f"[sweep {spec.name}] FAILED: {failed} of {len(rows)} point(s) failed; their errors: {table}")
        return 1
    print(f"[sweep {spec.name}] all {len(rows)} point(s) ok: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
