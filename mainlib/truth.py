"""Truth alignment: how close a synthetic instruction is to the instruction its response really answers.

The filters rank synthetic pairs by the models' own likelihoods, so ranking them by those same likelihoods
cannot tell whether a filter keeps good pairs. Where the true instruction is known (the bundled GSM8K pool keeps
each solution's question as `reference_instruction`), two measures outside the filters can:

* `rouge_l`: ROUGE-L F-measure between the synthetic and the true instruction. Surface overlap, model-free: it
  cannot favour a filter for sharing that filter's model.
* `true_instruction_loglik`: the true instruction's mean per-token log-likelihood under the reverse model given
  the response, log p_r(x | y) / |x| (`scoring.score_pairs`, direction "reverse"). It says how well the reverse
  model that wrote the instructions has learnt what the responses ask, whatever wording it then sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from mainlib import data
from mainlib.data import Pair
from mainlib.scoring import ScoringSettings, score_pairs


def rouge_l(synthetic: Sequence[str], true: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each synthetic instruction against its true one (1: same words in the same order)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(t, s)["rougeL"].fmeasure for s, t in zip(synthetic, true, strict=True)]


def true_instruction_loglik(
    model,
    tokenizer: PreTrainedTokenizerBase,
    responses: Sequence[str],
    true: Sequence[str],
    settings: ScoringSettings | None = None,
    system: str | None = None,
) -> list[float]:
    """(1/|x|) Σ log p_r(x_t | y, x_<t) of each true instruction x given its response y, under `model` (the
    reverse model, scored as the mutual filter scores s_r: same template, same `system` tag)."""
    pairs = [Pair(x, y) for x, y in zip(true, responses, strict=True)]
    return [s.mean for s in score_pairs(model, tokenizer, "reverse", pairs, settings, system)]


def reference_instructions(path: str | Path | None = None) -> dict[str, str]:
    """The true instruction of each pool row by its `source` (which synthetic pairs keep): the bundled unlabeled
    pool by default, or any JSONL file whose rows carry `source` and `reference_instruction`."""
    path = data.bundled_path(data.BUNDLED_FILES["unlabeled"]) if path is None else Path(path)
    return {
        row["source"]: row["reference_instruction"] for row in data.load_jsonl(path) if "reference_instruction" in row
    }
