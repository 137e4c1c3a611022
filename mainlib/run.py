"""Run a pipeline from a recipe: in one process, or in many under `accelerate launch`.

    python -m mainlib.run quickstart                                  # MAIN on the bundled recipe
    python -m mainlib.run mainlib/recipes/paper.yaml --pipeline musc --until decompose
    python -m mainlib.run quickstart --set run_name=big n_pool=2000   # flat names, as in the notebooks
    accelerate launch --num_processes 8 -m mainlib.run mainlib/recipes/paper.yaml
    accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml -m mainlib.run my_recipe.yaml

The notebooks' code path: `config.build(<config class>, recipe, **flat)`, then `run_main` or `run_musc`, which
check the whole config before any model loads and resume whatever an earlier (or killed) launch finished.
Every process runs this same command; docs/SCALING.md says what each one does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mainlib import distributed
from mainlib.config import CONFIGS, build
from mainlib.yamlfile import Loader


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`name=value` pairs, each value read as YAML (`n_pool=100` is an int, `adapter=null` is None)."""
    flat: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"--set {item!r}: write name=value, e.g. n_pool=100")
        flat[name] = yaml.load(text, Loader=Loader)  # a SafeLoader
    return flat


def run(pipeline: str, recipe: str, until: str | None, force: bool, flat: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) `pipeline` from `recipe`; each finished stage's counts, and which ran now (same in every
    process)."""
    config = build(CONFIGS[pipeline], recipe, **flat)
    stop = {"until": until} if until else {}
    if pipeline == "main":
        from mainlib.pipeline import run_main

        state = run_main(config, **stop, force=force)
        counts = {name: manifest.get("counts") for name, manifest in state.stages.items()}
    else:
        from mainlib.musc.pipeline import run_musc

        state = run_musc(config, **stop, force=force)
        counts = state.counts
    return {"folder": str(Path(config.runs_dir) / config.run_name), "ran": state.ran, "counts": counts}


def report(summary: dict[str, Any]) -> str:
    """One line per stage: computed now or up to date, and its counts."""
    lines = [f"run folder: {summary['folder']}"]
    for name, counts in summary["counts"].items():
        done = "computed" if name in summary["ran"] else "up to date"
        lines.append(f"  {name:<14} {done:<10} {json.dumps(counts, default=str)[:200]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mainlib.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a bundled recipe name (quickstart, paper) or a YAML file")
    parser.add_argument("--pipeline", choices=list(CONFIGS), default="main", help="which section of the recipe")
    parser.add_argument("--until", help="stop after this stage (default: the last)")
    parser.add_argument("--force", action="store_true", help="recompute every stage (old outputs kept aside)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="flat parameter overrides")
    args = parser.parse_args(argv)
    try:
        flat = parse_overrides(args.set)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    summary = run(args.pipeline, args.recipe, args.until, args.force, flat)
    if distributed.is_main():
        print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
