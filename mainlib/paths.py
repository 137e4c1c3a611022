"""Where things live. Every location can be moved with an environment variable; nothing is hard-coded."""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "data" / "bundled"


def cache_dir() -> Path:
    """`$MAINLIB_CACHE` (default `~/.cache/mainlib`): converted models and other derived, re-creatable files."""
    return Path(os.environ.get("MAINLIB_CACHE", Path.home() / ".cache" / "mainlib")).expanduser()


def data_dir() -> Path:
    """`$MAINLIB_DATA_DIR`: the full public datasets (GSM8K, MMLU, ...). Only needed beyond the bundled pack."""
    value = os.environ.get("MAINLIB_DATA_DIR")
    if not value:
        raise RuntimeError(
            "MAINLIB_DATA_DIR is not set. Point it at a folder holding the full datasets "
            "(gsm8k_test.jsonl, mmlu/, HumanEval.jsonl.gz, ifeval_input_data.jsonl, ...), "
            "or use the bundled pack (mainlib.data.load_bundled)."
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"MAINLIB_DATA_DIR={value!r} is not a directory")
    return path
