"""Figures. Each function takes plain results (dicts/lists as stored in the JSON) and returns a Figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def loss_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], title: str = "SFT loss") -> Figure:
    """One panel per run (e.g. forward, reverse): loss per logged step; with synthetic data, each group's too."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items(), strict=True):
        steps = [r["step"] for r in rows]
        mixed = any("synthetic_loss" in r for r in rows)
        ax.plot(steps, [r["loss"] for r in rows], marker="o", ms=3, label="α-weighted loss" if mixed else "loss")
        if mixed:  # seed + synthetic data: each group's own (unweighted) loss too
            for key, style in (("seed_loss", "--"), ("synthetic_loss", ":")):
                points = [(r["step"], r[key]) for r in rows if key in r]
                ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "))
        for r in rows[:-1]:  # a faint line where each epoch ends
            if "epoch" in r and float(r["epoch"]).is_integer():
                ax.axvline(r["step"] + 0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{title}: {name}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("mean target NLL (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Save as PNG (for notebooks and the README) and PDF (for papers); return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return paths


def score_histograms(scores: Mapping[str, Sequence[float]], kept: Sequence[int]) -> Figure:
    """One histogram per score (e.g. s_f, s_r, combined), kept and dropped pairs stacked in two colours."""
    kept_set = set(kept)
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        kept_values = [v for i, v in enumerate(values) if i in kept_set]
        dropped_values = [v for i, v in enumerate(values) if i not in kept_set]
        ax.hist(
            [kept_values, dropped_values],
            bins=15,
            stacked=True,
            label=["kept", "dropped"],
            color=["tab:green", "tab:grey"],
        )
        ax.set_title(name)
        ax.set_xlabel("score")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("pairs")
    fig.tight_layout()
    return fig


def score_scatter(
    z_forward: Sequence[float], z_reverse: Sequence[float], kept: Sequence[int], lam: float, cutoff: float | None
) -> Figure:
    """z(s_f) against z(s_r), kept pairs in colour; the line λ·z_f + (1−λ)·z_r = cutoff is the selection boundary."""
    kept_set = set(kept)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    for chosen, colour, label in ((True, "tab:green", "kept"), (False, "tab:grey", "dropped")):
        points = [
            (f, r) for i, (f, r) in enumerate(zip(z_forward, z_reverse, strict=True)) if (i in kept_set) == chosen
        ]
        if points:
            ax.scatter(*zip(*points, strict=True), s=14, color=colour, label=label, alpha=0.8)
    if cutoff is not None and 0 < lam < 1:
        xs = [min(z_forward) - 0.3, max(z_forward) + 0.3]
        ax.plot(xs, [(cutoff - lam * x) / (1 - lam) for x in xs], "k--", lw=1, label=f"λ={lam:g} boundary")
        ax.set_ylim(min(z_reverse) - 0.5, max(z_reverse) + 0.5)
    ax.set_xlabel("z(s_f): instruction explains the response")
    ax.set_ylabel("z(s_r): response implies the instruction")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def token_weight_heatmap(
    sequences: Mapping[str, tuple[Sequence[str], Sequence[float]]],
    w_max: float = 2.0,
    columns: int = 12,
    max_tokens: int = 96,
) -> Figure:
    """Each response's tokens in reading order (`columns` per row), coloured by their MuSC weight in [0, w_max]."""
    fig, axes = plt.subplots(len(sequences), 1, figsize=(1.05 * columns, 1.0), squeeze=False)
    heights = []
    for ax, (name, (tokens, weights)) in zip(axes[:, 0], sequences.items(), strict=True):
        tokens, weights = list(tokens)[:max_tokens], list(weights)[:max_tokens]
        rows = max(1, -(-len(tokens) // columns))
        heights.append(rows)
        grid = [[float("nan")] * columns for _ in range(rows)]
        for i, w in enumerate(weights):
            grid[i // columns][i % columns] = w
        image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=w_max, aspect="auto")
        for i, (token, w) in enumerate(zip(tokens, weights, strict=False)):
            text = token.replace("\n", "⏎").replace("Ġ", " ").replace("Ċ", "⏎")[:9]
            color = "black" if w > 0.6 * w_max else "white"  # legible on viridis' bright end
            ax.text(i % columns, i // columns, text, ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks([])
        ax.set_yticks([])
        shown = "" if len(list(sequences[name][0])) <= max_tokens else f" (first {max_tokens} tokens)"
        ax.set_title(f"{name}{shown}", fontsize=9, loc="left")
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01, label="weight")
    fig.set_size_inches(1.05 * columns, 0.42 * sum(heights) + 0.9 * len(heights))
    fig.tight_layout()
    return fig


def dpo_curves(log: Sequence[Mapping[str, float]], title: str = "token-weighted DPO") -> Figure:
    """Loss, reward margin and reward accuracy per logged step (TRL's metrics, weighted rewards)."""
    panels = (("loss", "loss"), ("rewards/margins", "reward margin r_w − r_l"), ("rewards/accuracies", "accuracy"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    steps = [r["step"] for r in log]
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in log], marker="o", ms=3)
        ax.set_title(label)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    axes[0].axhline(0.6931, color="grey", ls=":", lw=0.8, label="log 2 (policy = reference)")
    axes[0].legend(fontsize=8)
    axes[2].set_ylim(-0.05, 1.05)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def benchmark_bars(rows: Sequence[Mapping], title: str = "benchmarks") -> Figure:
    """Grouped bars: one group per benchmark (its headline metric), one bar per model label, ±1 stderr."""
    headline = [r for r in rows if r.get("headline")]
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in headline))
    labels = list(dict.fromkeys(r.get("label") or r.get("adapter") or r["model"] for r in headline))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(benchmarks) * max(1, len(labels)) / 2 + 2), 3.8))
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        values, errors = [], []
        for benchmark in benchmarks:
            row = next(
                (
                    r
                    for r in headline
                    if r["benchmark"] == benchmark and (r.get("label") or r.get("adapter") or r["model"]) == label
                ),
                None,
            )
            values.append(row["value"] if row else float("nan"))
            errors.append(row["stderr"] or 0.0 if row else 0.0)
        positions = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(benchmarks))]
        ax.bar(positions, values, width, yerr=errors, capsize=3, label=label)
    metrics = {r["benchmark"]: r["metric"] for r in headline}
    ax.set_xticks(range(len(benchmarks)), [f"{b}\n({metrics[b]})" for b in benchmarks], fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def funnel(steps: Sequence[tuple[str, int]], title: str) -> Figure:
    """How many items are left after each step of a pipeline (MAIN's filtering, MuSC's survival)."""
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(steps) + 1.2))
    names, counts = [s[0] for s in steps][::-1], [s[1] for s in steps][::-1]
    bars = ax.barh(names, counts, color="tab:blue", alpha=0.8)
    ax.bar_label(bars, padding=3, fontsize=8)
    ax.set_xlabel("items left")
    ax.set_title(title)
    ax.set_xlim(0, max([*counts, 1]) * 1.15)
    fig.tight_layout()
    return fig
