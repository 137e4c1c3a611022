"""Targets, verdicts and the figure for a benchmark file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Target = tuple[str, tuple[str, ...], str, float]  # (label, path of keys to the measured value, comparison, target)

# The targets on an H100 / H200 (the `gpu` profile; `smoke` reads them too).
GPU_TARGETS: list[Target] = [
    ("SFT 1B tokens/s vs stock", ("sft", "llama-3.2-1b", "speedup"), ">=", 2.0),
    ("SFT 1B peak memory vs stock", ("sft", "llama-3.2-1b", "memory_ratio"), "<=", 1.0),
    ("SFT 7B tokens/s vs stock", ("sft", "llama-2-7b", "speedup"), ">=", 1.5),
    ("7B QLoRA 1x2048 peak GiB", ("memory", "bf16", "ours", "peak_gib"), "<=", 12.0),
    ("7B QLoRA 1x2048 peak GiB, fp16 (T4)", ("memory", "fp16_t4_path", "ours", "peak_gib"), "<=", 15e9 / 1024**3),
    ("generation tokens/s vs stock", ("generate", "speedup"), ">=", 10.0),
    ("scoring pairs/s vs naive loop", ("score", "speedup"), ">=", 5.0),
    ("token-weighted DPO step time vs stock", ("tdpo", "step_time_ratio"), "<=", 1.10),
    ("token-weighted DPO peak memory vs stock", ("tdpo", "memory_ratio"), "<=", 1.05),
]

# The targets on the 2-core CPU (the `cpu` profile, SmolLM2-135M shape); memory is the peak resident set.
CPU_TARGETS: list[Target] = [
    ("SFT tokens/s vs stock TRL", ("sft", "smollm2-135m", "speedup"), ">=", 2.5),
    ("SFT peak RSS vs stock TRL", ("sft", "smollm2-135m", "memory_ratio"), "<=", 1.0),
    ("generation tokens/s vs stock", ("generate", "speedup"), ">=", 3.0),
    ("scoring pairs/s vs naive loop", ("score", "speedup"), ">=", 2.0),
    ("token-weighted DPO step time vs stock", ("tdpo", "step_time_ratio"), "<=", 1.0),
]
TARGETS = {"gpu": GPU_TARGETS, "smoke": GPU_TARGETS, "cpu": CPU_TARGETS}


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def verdicts(suites: dict, profile: str = "gpu") -> list[dict]:
    """One row per target of `profile`: the measured value (None when not measured) and whether it holds.

    GPU targets: the SFT row of the first shape measured stands in for the 1B one when the 1B shape was not run.
    """
    rows = []
    sft = suites.get("sft", {})
    stand_in = None
    if "llama-3.2-1b" not in sft and sft:
        stand_in = next(k for k, v in sft.items() if isinstance(v, dict) and "speedup" in v)
        suites = {**suites, "sft": {**sft, "llama-3.2-1b": sft[stand_in]}}
    for label, path, op, target in TARGETS[profile]:
        value = _get(suites, path)
        if stand_in and path[:2] == ("sft", "llama-3.2-1b"):
            label = label.replace("1B", stand_in)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        rows.append({"target": label, "value": value, "op": op, "threshold": target, "met": met})
    return rows


def checks(suites: dict) -> dict[str, bool]:
    """Every correctness check recorded anywhere in the suites: name -> ok."""
    found: dict[str, bool] = {}

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, dict):
            if "ok" in tree and isinstance(tree["ok"], bool):
                found[prefix] = tree["ok"]
                return
            for key, value in tree.items():
                walk(value, f"{prefix}/{key}" if prefix else key)

    walk({k: v for k, v in suites.items()}, "")
    return {k: v for k, v in found.items() if "/check/" in f"/{k}/"}


def plot(rows: list[dict], title: str, path: str | Path) -> Path:
    """Bars of measured / threshold per target (1 = exactly on target); green where met."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["value"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(3, len(shown)) + 1))
    for y, row in enumerate(shown):
        # Normalise so that right of 1 is always better: value/threshold for >=, threshold/value for <=.
        score = row["value"] / row["threshold"] if row["op"] == ">=" else row["threshold"] / row["value"]
        ax.barh(y, score, color="tab:green" if row["met"] else "tab:red")
        ax.text(score, y, f"  {row['value']:.2f} ({row['op']} {row['threshold']:g})", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_yticks(range(len(shown)), [r["target"] for r in shown], fontsize=8)
    ax.set_xlabel("measured / target (right of 1 = target met)")
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
