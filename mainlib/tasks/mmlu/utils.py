"""Loader for the offline MMLU subject tasks (lm-eval `custom_dataset`)."""

from mainlib.tasks.utils import load_subject  # noqa: F401
