"""The package's declared dependencies agree everywhere, and CI runs the README's test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_dependencies_as_pyproject() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    env_requirements = {r for r in pip_section if not r.startswith("-")}
    declared = {_name(r): r for r in pyproject["dependencies"]}
    in_env = {_name(r): r for r in env_requirements}
    assert set(in_env) - {"torch"} == set(declared)
    assert {k: v.replace(" ", "") for k, v in declared.items()} == {
        k: v.replace(" ", "") for k, v in in_env.items() if k != "torch"
    }  # same names and the same lower bounds
    assert "-e .[dev]" in pip_section


def test_ci_runs_make_test() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "set -euo pipefail" in ci
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme


def test_ruff_clean() -> None:
    import subprocess
    import sys

    for command in (["check", "."], ["format", "--check", "."]):
        run = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
