"""Bootstrap confidence intervals for the study's comparisons, all through `scipy.stats.bootstrap`.

A difference between two filters or two training cells measured once, on one pool or one benchmark, says
nothing about how much of it is resampling noise. Each function here returns the point estimate with a
percentile-family interval (BCa by default) over the items that were measured: pool pairs, benchmark prompts.

* `mean_ci`: the mean of one set of per-item values.
* `paired_difference_ci`: mean(a − b) over the same items measured twice (e.g. per-prompt IFEval scores of two
  cells): resampling items keeps each a_i with its b_i, so the items' own difficulty cancels.
* `selection_difference_ci`: mean alignment of the pairs filter A keeps minus that of filter B's, at one
  `top_fraction`; each resample of the pool re-selects, so the interval includes the selection's own variance.
* `auc_ci` / `alignment_auc_ci`: how well a filter score ranks pairs of above-median alignment first.
* `stratified_ci`: the mean over seeds of any of these per-seed statistics, each seed's items resampled within
  that seed (a seed's pool, its own selection): the headline number of a comparison run with several seeds.

An interval is degenerate, (estimate, estimate, estimate), when every resample gives the same statistic (a
constant sample), where BCa itself would return NaN. Cost: BCa adds a jackknife of n statistics over n − 1 items;
for pools of tens of thousands of items, `Resampling(method="percentile")` skips it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from scipy.stats import bootstrap, mannwhitneyu

from mainlib.mutual import kept_count

Method = Literal["BCa", "percentile", "basic"]
Statistic = Callable[..., np.ndarray]


@dataclass(frozen=True)
class Resampling:
    """How every interval here is drawn: the same defaults for all, one argument to change them."""

    confidence: float = 0.95
    n_resamples: int = 9999
    seed: int = 0
    method: Method = "BCa"  # "percentile" skips BCa's jackknife (n statistics) for very large samples


class Interval(NamedTuple):
    """A point estimate and the bounds of its confidence interval; unpacks as (estimate, low, high)."""

    estimate: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return dict(self._asdict())


def _interval(samples: Sequence[Sequence[float]], statistic: Statistic, paired: bool, r: Resampling) -> Interval:
    """The statistic on the samples and scipy's bootstrap interval of it (`statistic(*samples, axis=...)` must be
    vectorised along `axis`)."""
    data = tuple(np.asarray(s, dtype=float) for s in samples)
    estimate = float(statistic(*data, axis=-1))
    with warnings.catch_warnings(record=True) as caught:  # BCa's warnings about a constant distribution, mostly
        warnings.simplefilter("always")
        result = bootstrap(
            data,
            statistic,
            n_resamples=r.n_resamples,
            vectorized=True,
            batch=max(1, 2**23 // max(len(d) for d in data)),  # resamples at a time: ~8M values per array
            paired=paired,
            axis=-1,
            confidence_level=r.confidence,
            method=r.method,
            rng=np.random.default_rng(r.seed),
        )
    if np.ptp(result.bootstrap_distribution) <= 1e-12 * max(1.0, abs(estimate)):
        return Interval(estimate, estimate, estimate)
    for warning in caught:  # not a constant distribution: what scipy warned about is the caller's to see
        warnings.warn(warning.message, warning.category, stacklevel=3)
    return Interval(estimate, float(result.confidence_interval.low), float(result.confidence_interval.high))


def mean_ci(
    values: Sequence[float],
    resampling: Resampling = Resampling(),
) -> Interval:
    """The mean of per-item values and its bootstrap interval over the items."""
    return _interval((values,), np.mean, False, resampling)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a - b, axis=axis)


def paired_difference_ci(
    a: Sequence[float],
    b: Sequence[float],
    resampling: Resampling = Resampling(),
) -> Interval:
    """mean(a − b) over items measured under both conditions (a_i and b_i on the same item), resampled in pairs."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one a and one b per item; got {len(a)} and {len(b)}")
    return _interval((a, b), _mean_difference, True, resampling)


def kept_mean(alignment: np.ndarray, score: np.ndarray, top_fraction: float, axis: int = -1) -> np.ndarray:
    """Mean alignment of the ceil(top_fraction · n) best-scoring items along `axis`, ties to the earlier item:
    `mutual.select`'s choice, vectorised over resamples."""
    alignment, score = np.moveaxis(alignment, axis, -1), np.moveaxis(score, axis, -1)
    best = np.argsort(-score, axis=-1, kind="stable")[..., : kept_count(score.shape[-1], top_fraction)]
    return np.take_along_axis(alignment, best, axis=-1).mean(axis=-1)


def selection_difference_ci(
    alignment: Sequence[float],
    score_a: Sequence[float],
    score_b: Sequence[float],
    top_fraction: float,
    resampling: Resampling = Resampling(),
) -> Interval:
    """Mean alignment of the pairs filter A keeps minus that of the pairs filter B keeps, both keeping
    `top_fraction` of the pool; each bootstrap resample of the pool selects again."""
    if not len(alignment) == len(score_a) == len(score_b):
        raise ValueError(f"one alignment and two scores per pair; got {len(alignment)}, {len(score_a)}, {len(score_b)}")

    def difference(al: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return kept_mean(al, a, top_fraction, axis) - kept_mean(al, b, top_fraction, axis)

    return _interval((alignment, score_a, score_b), difference, True, resampling)


def _auc(positive: np.ndarray, negative: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(positive > negative) + ½ P(tie): the Mann–Whitney U of the positives over n_pos · n_neg, as
    `mutual.roc_auc` defines it, but vectorised (that one is a Python double loop, too slow for 10⁴ resamples)."""
    u = mannwhitneyu(positive, negative, axis=axis, method="asymptotic").statistic
    return u / (positive.shape[axis] * negative.shape[axis])


def auc_ci(
    positive: Sequence[float],
    negative: Sequence[float],
    resampling: Resampling = Resampling(),
) -> Interval:
    """ROC-AUC of a score for telling positive items from negative ones; positives and negatives are resampled
    separately (a stratified bootstrap), so no resample lacks a class."""
    if not len(positive) or not len(negative):
        raise ValueError(f"ROC-AUC needs both classes; got {len(positive)} positive and {len(negative)} negative")
    return _interval((positive, negative), _auc, False, resampling)


def alignment_auc_ci(
    score: Sequence[float],
    alignment: Sequence[float],
    resampling: Resampling = Resampling(),
) -> Interval:
    """ROC-AUC of a filter score for finding the pairs whose alignment is above the pool's median (0.5: the score
    knows nothing of the alignment; 1: it ranks every above-median pair first)."""
    values, aligned = np.asarray(score, dtype=float), np.asarray(alignment, dtype=float)
    if len(values) != len(aligned):
        raise ValueError(f"one score per alignment value; got {len(values)} and {len(aligned)}")
    above = aligned > np.median(aligned)
    return auc_ci(values[above], values[~above], resampling)


def stratified_ci(
    groups: Sequence[Sequence[Sequence[float]]],
    statistic: Statistic,
    resampling: Resampling = Resampling(),
) -> Interval:
    """The mean over groups (e.g. seeds) of `statistic(*samples, axis=-1)` on each group's paired samples, with a
    percentile interval from a stratified bootstrap: each resample redraws every group's items within the group,
    so groups count equally whatever their sizes and no item moves between groups (one group: the plain paired
    percentile bootstrap)."""
    if not groups:
        raise ValueError("stratified_ci needs at least one group")
    data = [tuple(np.asarray(s, dtype=float) for s in group) for group in groups]
    if uneven := [i for i, group in enumerate(data) if len({len(s) for s in group}) != 1]:
        raise ValueError(f"the samples of a group are paired: one length per group; group {uneven[0]} is uneven")
    estimate = float(np.mean([statistic(*group, axis=-1) for group in data]))
    rng = np.random.default_rng(resampling.seed)
    draws = np.zeros(resampling.n_resamples)
    for group in data:
        n = len(group[0])
        batch = max(1, 2**23 // n)  # resamples at a time: ~8M indices
        for start in range(0, resampling.n_resamples, batch):
            index = rng.integers(0, n, size=(min(batch, resampling.n_resamples - start), n))
            draws[start : start + len(index)] += statistic(*(s[index] for s in group), axis=-1)
    draws /= len(data)
    tail = (1 - resampling.confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high))
