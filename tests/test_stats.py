"""Bootstrap intervals on samples whose answer is known: constant samples, exact shifts, perfect rankings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mainlib.mutual import roc_auc, select
from mainlib.stats import (
    Interval,
    Resampling,
    alignment_auc_ci,
    auc_ci,
    kept_mean,
    mean_ci,
    paired_difference_ci,
    selection_difference_ci,
)

FAST = Resampling(n_resamples=2000)


def contains(interval: Interval, value: float) -> bool:
    return interval.low <= value <= interval.high


def test_mean_of_a_constant_is_a_point_and_a_sample_brackets_its_mean() -> None:
    estimate, low, high = mean_ci([0.7] * 12, FAST)
    assert estimate == pytest.approx(0.7) and low == estimate == high
    values = np.random.default_rng(1).normal(2.0, 1.0, 200)
    found = mean_ci(values, FAST)
    assert found.estimate == pytest.approx(values.mean()) and found.low < found.estimate < found.high
    assert contains(found, 2.0) and 0.15 < found.high - found.low < 0.45  # ≈ 2 · 1.96 / √200 = 0.28
    assert mean_ci(values, FAST) == found and mean_ci(values, Resampling(n_resamples=2000, seed=1)) != found
    assert found.to_dict() == {"estimate": found.estimate, "low": found.low, "high": found.high}
    narrow = mean_ci(values, replace(FAST, confidence=0.5))
    assert found.low < narrow.low < narrow.high < found.high


def test_paired_difference_of_an_exact_shift_is_a_point() -> None:
    b = np.random.default_rng(2).uniform(0, 1, 30)
    estimate, low, high = paired_difference_ci(b + 0.5, b, FAST)
    assert estimate == pytest.approx(0.5) and low == estimate == high


def test_paired_difference_pairs_the_items() -> None:
    """Items differ a lot (sd 5), the shift is small (0.3) and the noise smaller (sd 0.2): only pairing finds it."""
    rng = np.random.default_rng(3)
    item = rng.normal(0.0, 5.0, 50)
    a, b = item + 0.3 + rng.normal(0, 0.2, 50), item + rng.normal(0, 0.2, 50)
    found = paired_difference_ci(a, b, FAST)
    assert contains(found, 0.3) and found.low > 0 and found.estimate == pytest.approx(np.mean(a - b))
    assert paired_difference_ci(b, a, FAST).high < 0
    with pytest.raises(ValueError, match="one a and one b per item"):
        paired_difference_ci([1.0, 2.0], [1.0])


def test_kept_mean_selects_as_select_does() -> None:
    alignment = np.arange(8, dtype=float)
    scores = np.array([[3, 1, 3, 0, 2, 2, 1, 3], [0, 0, 0, 0, 0, 0, 0, 1]], dtype=float)  # ties: the earlier item
    for fraction in (0.2, 0.5, 1.0):
        expected = [np.mean(alignment[select(list(row), fraction)]) for row in scores]
        assert kept_mean(np.tile(alignment, (2, 1)), scores, fraction).tolist() == pytest.approx(expected)
    assert kept_mean(np.tile(alignment, (2, 1)).T, scores.T, 0.25, axis=0).tolist() == pytest.approx([1.0, 3.5])


def test_selection_difference_of_a_perfect_and_an_inverted_filter() -> None:
    alignment = np.random.default_rng(4).uniform(0, 1, 60)
    found = selection_difference_ci(alignment, alignment, -alignment, 0.5, FAST)
    top, bottom = select(list(alignment), 0.5), select(list(-alignment), 0.5)
    assert found.estimate == pytest.approx(alignment[top].mean() - alignment[bottom].mean())
    assert found.estimate > 0.4 and found.low > 0 and contains(found, found.estimate)
    assert selection_difference_ci(alignment, -alignment, alignment, 0.5, FAST).high < 0
    assert selection_difference_ci(alignment, alignment, alignment * 2, 0.3, FAST) == (0.0, 0.0, 0.0)


def test_auc_is_mutual_roc_auc_with_an_interval() -> None:
    positive, negative = [0.9, 0.4, 0.4, 0.7], [0.4, 0.1, 0.5]
    found = auc_ci(positive, negative, FAST)
    assert found.estimate == pytest.approx(roc_auc(positive, negative)) and found.low <= found.estimate <= found.high
    assert auc_ci([2.0, 3.0], [0.0, 1.0], FAST) == (1.0, 1.0, 1.0)  # every stratified resample separates
    with pytest.raises(ValueError, match="both classes"):
        auc_ci([], [1.0])


def test_alignment_auc_of_perfect_inverted_and_unrelated_scores() -> None:
    rng = np.random.default_rng(5)
    alignment = rng.uniform(0, 1, 200)
    assert alignment_auc_ci(alignment, alignment, FAST) == (1.0, 1.0, 1.0)
    assert alignment_auc_ci(-alignment, alignment, FAST) == (0.0, 0.0, 0.0)
    assert contains(alignment_auc_ci(rng.uniform(0, 1, 200), alignment, FAST), 0.5)
    noisy = alignment_auc_ci(alignment + rng.normal(0, 0.2, 200), alignment, FAST)
    assert 0.5 < noisy.low < noisy.estimate < noisy.high < 1.0
