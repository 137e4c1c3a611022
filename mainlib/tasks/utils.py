"""The Python hooks of the offline task YAMLs (`!function utils.<name>`): data loaders and the two metrics
whose lm-eval versions need the network (HumanEval's `code_eval`, IFEval's Punkt download)."""

from __future__ import annotations

from typing import Any

from mainlib import benchmarks
from mainlib.execution import score_samples


def load_gsm8k(mainlib_source: str = "bundled", **_: Any):
    return benchmarks.gsm8k(mainlib_source)


def load_subject(subject: str, mainlib_source: str = "bundled", **_: Any):
    return benchmarks.mmlu(subject, mainlib_source)


def load_humaneval(mainlib_source: str = "bundled", **_: Any):
    return benchmarks.humaneval(mainlib_source)


def load_ifeval(mainlib_source: str = "bundled", **_: Any):
    return benchmarks.ifeval(mainlib_source)


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """The function under test: HumanEval's prompt (signature + docstring) followed by each completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int = 1) -> dict[str, float]:
    """Runs the programs (mainlib.execution; needs the opt-in) and returns {"pass@k": ...} for this problem."""
    return score_samples(references, predictions, k=[k] if isinstance(k, int) else k)


def _ifeval_utils():
    from mainlib.nltk_data import ensure_punkt

    ensure_punkt()  # before lm-eval's IFEval module is imported: it downloads Punkt when it cannot find it
    from lm_eval.tasks.ifeval import utils

    return utils


def ifeval_process_results(doc: dict, results: list[str]) -> dict[str, Any]:
    return _ifeval_utils().process_results(doc, results)


def ifeval_agg_inst_level_acc(items: list) -> float:
    return _ifeval_utils().agg_inst_level_acc(items)


def load_ifeval_subset(mainlib_source: str = "full", **_: Any):
    return benchmarks.ifeval_subset(mainlib_source)
