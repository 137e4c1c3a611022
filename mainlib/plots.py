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
