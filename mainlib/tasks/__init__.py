"""Offline lm-eval tasks (YAML), registered by path: `TaskManager(include_path=TASKS_DIR)`.

Each is a twin of an lm-eval built-in task (same prompt, generation settings, filters and metric) that
reads local files through `mainlib.benchmarks`; the metadata key `mainlib_source` picks the bundled
subsets or the full sets in $MAINLIB_DATA_DIR.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
