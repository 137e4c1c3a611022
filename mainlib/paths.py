"""Where things live. Every location can be moved with an environment variable; nothing is hard-coded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "data" / "bundled"


def cache_dir() -> Path:
    """`$MAINLIB_CACHE` (default `~/.cache/mainlib`): converted models and other derived, re-creatable files."""
    return Path(os.environ.get("MAINLIB_CACHE", Path.home() / ".cache" / "mainlib")).expanduser()


class CacheNotWritable(PermissionError):
    """`$MAINLIB_CACHE` cannot be written, and something derived (a converted model, NLTK data) must be."""


def writable_cache(sub: str) -> Path:
    """`cache_dir()/sub`, created and checked writable (a temporary file is made and removed there).

    A read-only cache otherwise fails deep inside a model conversion with a bare OSError that names neither
    the variable nor what to do.
    """
    folder = cache_dir() / sub
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        where = "MAINLIB_CACHE" if "MAINLIB_CACHE" in os.environ else "MAINLIB_CACHE (unset: ~/.cache/mainlib)"
        raise CacheNotWritable(
            f"{where} = {cache_dir()} is not writable ({e.strerror or e}): mainlib keeps {sub} there. "
            "Point MAINLIB_CACHE at a writable folder."
        ) from e
    return folder


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
