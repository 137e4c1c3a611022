"""One figure per claim, from `report`'s rows: points with 95% interval bars."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _points(
    ax: Axes, rows: Sequence[Mapping[str, Any]], labels: Sequence[str], offset: float = 0.0, **style: Any
) -> None:
    """Estimates at x = 0..n-1 (+ offset) with their intervals as error bars."""
    xs = [i + offset for i in range(len(rows))]
    estimates = [r["estimate"] for r in rows]
    errors = [[r["estimate"] - r["low"] for r in rows], [r["high"] - r["estimate"] for r in rows]]
    ax.errorbar(xs, estimates, yerr=errors, fmt="o", capsize=3, **style)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.grid(alpha=0.3)


def no_cells(title: str) -> Figure:
    """The figure of a claim none of whose cells has finished yet."""
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"{title}: no finished cells yet", ha="center", va="center")
    return fig


def selection_figure(claim: Mapping[str, Any]) -> Figure:
    """Claim 1: mean alignment of the kept pairs per filter, one panel per alignment measure."""
    measures = sorted({r["alignment"] for r in claim["kept"]})
    if not measures:
        return no_cells("claim 1")
    fig, axes = plt.subplots(1, len(measures), figsize=(6 * len(measures), 3.8), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        fractions = sorted({r["top_fraction"] for r in claim["kept"]})
        for j, fraction in enumerate(fractions):
            rows = [r for r in claim["kept"] if r["alignment"] == measure and r["top_fraction"] == fraction]
            _points(ax, rows, [r["filter"] for r in rows], offset=0.15 * j, label=f"top {fraction:g}")
        ax.set_title(f"claim 1: {measure} of the kept pairs")
        ax.set_ylabel(measure)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_figure(claim: Mapping[str, Any]) -> Figure:
    """Claim 2: GSM8K test-solution NLL per token for each arm (lower is better)."""
    if not claim["nll"]:
        return no_cells("claim 2")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    labels = [f"{r['arm']}\n({len(r['seeds'])} seed{'s' * (len(r['seeds']) != 1)})" for r in claim["nll"]]
    _points(ax, claim["nll"], labels)
    ax.set_title("claim 2: GSM8K test NLL per arm, averaged over its seeds")
    ax.set_ylabel("nats / token (lower is better)")
    fig.tight_layout()
    return fig


def rounds_figure(claim: Mapping[str, Any]) -> Figure:
    """Claim 3: each recovery measure against the number of rounds k."""
    measures = list(dict.fromkeys(r["measure"] for r in claim["by_k"]))
    if not measures:
        return no_cells("claim 3")
    fig, axes = plt.subplots(1, len(measures), figsize=(4.5 * len(measures), 3.6), squeeze=False)
    for ax, measure in zip(axes[0], measures, strict=True):
        rows = [r for r in claim["by_k"] if r["measure"] == measure]
        _points(ax, rows, [f"k={r['k']}" for r in rows])
        ax.set_title(f"claim 3: {measure}")
    fig.tight_layout()
    return fig


def weights_figure(claim: Mapping[str, Any]) -> Figure:
    """Claim 4: IFEval metrics per policy (base and each weight mode)."""
    metrics = list(dict.fromkeys(r["metric"] for r in claim["ifeval"]))
    policies = list(dict.fromkeys(r["policy"] for r in claim["ifeval"]))
    if not policies:
        return no_cells("claim 4")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for j, policy in enumerate(policies):
        rows = [r for r in claim["ifeval"] if r["policy"] == policy]
        _points(ax, rows, metrics, offset=0.12 * j, label=policy)
    ax.set_title(f"claim 4: IFEval by weight mode\n{claim['measured_on']}", fontsize=10)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
