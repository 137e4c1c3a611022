"""The study's cells, turned into each claim's numbers with 95% intervals and a verdict.

Every interval is a bootstrap over the measured items (pool pairs, held-out responses, test problems, IFEval
prompts, held-out preference pairs), stratified by seed where each seed measured its own items
(`stats.stratified_ci`), and paired where two conditions measured the same items. A comparison's verdict:
"held" when its interval excludes zero in the claimed direction, "not held" when it excludes zero the other way,
"inconclusive" when it contains zero. Each claim names its primary comparison; the others are reported beside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from mainlib.stats import Interval, Resampling, _auc, kept_mean, stratified_ci
from mainlib.study.cells import read_cell
from mainlib.study.main import ARMS, FILTERS
from mainlib.study.musc import IFEVAL_METRICS

ALIGNMENTS = ("rouge_l", "true_loglik")


def verdict(interval: Interval, better: str = "higher", per_seed: Sequence[float] = ()) -> str:
    """held / not held / inconclusive, for a difference claimed to be above (`higher`) or below zero. The interval
    resamples items, not training runs, so a verdict also needs every seed's own difference on its side of zero:
    one seed against the others leaves it inconclusive."""
    sign = 1 if better == "higher" else -1
    low, high = sorted((sign * interval.low, sign * interval.high))
    signed = [sign * d for d in per_seed]
    if low > 0 and all(d > 0 for d in signed):
        return "held"
    return "not held" if high < 0 and all(d < 0 for d in signed) else "inconclusive"


def comparison(interval: Interval, better: str, per_seed: Sequence[float] = (), **context: Any) -> dict[str, Any]:
    """A claimed difference: its interval, each seed's own difference, and the verdict."""
    seeds = [float(d) for d in per_seed]
    return {**context, **interval.to_dict(), "per_seed": seeds, "better": better} | {
        "verdict": verdict(interval, better, seeds)
    }


def per_group(groups: Sequence[Sequence[Any]], statistic: Callable[..., np.ndarray]) -> list[float]:
    """The statistic of each group (seed) on its own items."""
    return [float(statistic(*(np.asarray(s, dtype=float) for s in g), axis=-1)) for g in groups]


def cells_of(folder: Path, pattern: str, seeds: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The finished cells `pattern.format(seed=s)`, by seed (missing ones left out)."""
    found = {s: read_cell(folder, pattern.format(seed=s)) for s in seeds}
    return {s: cell for s, cell in found.items() if cell is not None}


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(values, axis=axis)


def _kept(fraction: float) -> Callable[..., np.ndarray]:
    def statistic(alignment: np.ndarray, score: np.ndarray, axis: int = -1) -> np.ndarray:
        return kept_mean(alignment, score, fraction, axis)

    return statistic


def _kept_difference(fraction: float) -> Callable[..., np.ndarray]:
    def statistic(alignment: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return kept_mean(alignment, a, fraction, axis) - kept_mean(alignment, b, fraction, axis)

    return statistic


def _above_median_auc(score: np.ndarray, alignment: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC-AUC of `score` for the items of above-median `alignment`, vectorised over resamples: the Mann-Whitney U
    of their average ranks (ties, e.g. equal Humpback ratings, count half), over n_above · n_below."""
    score, alignment = np.moveaxis(score, axis, -1), np.moveaxis(alignment, axis, -1)
    above = alignment > np.median(alignment, axis=-1, keepdims=True)
    n_above, n_below = above.sum(axis=-1), (~above).sum(axis=-1)
    u = np.where(above, rankdata(score, axis=-1), 0.0).sum(axis=-1) - n_above * (n_above + 1) / 2
    return u / np.maximum(n_above * n_below, 1)


def _counts(cells: dict[int, dict[str, Any]], key: str) -> str:
    """ "100" when every seed measured 100 items, "98-100" when they differ."""
    values = sorted(c[key] for c in cells.values()) or [0]
    return f"{values[0]}" if values[0] == values[-1] else f"{values[0]}-{values[-1]}"


# -- MAIN -------------------------------------------------------------------------------------------------------


def filter_auc(cells: dict[int, dict[str, Any]], name: str, measure: str, r: Resampling) -> Interval:
    """A filter score's ROC-AUC for above-median alignment, averaged over seeds."""
    return stratified_ci([(c["scores"][name], c[measure]) for c in cells.values()], _above_median_auc, r)


def claim_selection(folder: Path, seeds: Sequence[int], fractions: Sequence[float], r: Resampling) -> dict[str, Any]:
    """Claim 1: the truth alignment of what each filter keeps, its AUC for above-median alignment, and
    mutual-pmi against random and Humpback. Primary: ROUGE-L at top_fraction 0.5 (the spec's default)."""
    cells = cells_of(folder, "main/s{seed}/selection", seeds)
    if not cells:
        return {"kept": [], "auc": [], "comparisons": [], "primary": [], "seeds": [], "measured_on": "no cells yet"}
    rows, comparisons = [], []
    for measure in ALIGNMENTS:
        for fraction in fractions:
            for name in [*FILTERS, "none"]:
                groups = [
                    (c[measure], c["scores"].get(name, np.zeros(c["n"]))) for c in cells.values()
                ]  # none: every pair
                interval = stratified_ci(groups, _kept(1.0 if name == "none" else fraction), r)
                rows.append({"alignment": measure, "top_fraction": fraction, "filter": name, **interval.to_dict()})
            for baseline in ("random", "humpback"):
                groups = [(c[measure], c["scores"]["mutual_pmi"], c["scores"][baseline]) for c in cells.values()]
                interval = stratified_ci(groups, _kept_difference(fraction), r)
                per_seed = per_group(groups, _kept_difference(fraction))
                comparisons.append(
                    comparison(interval, "higher", per_seed, alignment=measure, top_fraction=fraction, versus=baseline)
                )
    auc = [{"alignment": m, "filter": f, **filter_auc(cells, f, m, r).to_dict()} for m in ALIGNMENTS for f in FILTERS]
    primary = [c for c in comparisons if c["alignment"] == "rouge_l" and c["top_fraction"] == 0.5]
    measured_on = f"{_counts(cells, 'n')} synthetic pairs (per seed)"
    return {"kept": rows, "auc": auc, "comparisons": comparisons, "primary": primary, "seeds": sorted(cells)} | {
        "measured_on": measured_on
    }


def _per_item(cells: dict[int, dict[str, Any]], key: Callable[[dict[str, Any]], list[float]]) -> np.ndarray:
    """Items measured by every seed (the same test problems): the mean over seeds, item by item."""
    return np.mean([key(c) for c in cells.values()], axis=0)


def claim_training(folder: Path, seeds: Sequence[int], r: Resampling) -> dict[str, Any]:
    """Claim 2: GSM8K test-solution NLL per token for each arm (lower is better), and mutual against the others,
    paired over problems (the same problems for every arm and seed): each problem's NLL averaged over the seeds
    both arms ran (the ablation arms run with the first seed only)."""
    found = {arm: cells_of(folder, f"main/s{{seed}}/arm_{arm}", seeds) for arm in ARMS}
    arms = {arm: cells for arm, cells in found.items() if cells}
    rows = [
        {"arm": arm, "seeds": sorted(c), **stratified_ci([(_per_item(c, lambda x: x["nll"]),)], _mean, r).to_dict()}
        for arm, c in arms.items()
    ]
    comparisons = []
    for other in (a for a in arms if a != "mutual" and "mutual" in arms):
        common = sorted(set(arms["mutual"]) & set(arms[other]))
        differences = [np.subtract(arms["mutual"][s]["nll"], arms[other][s]["nll"]) for s in common]
        if differences:
            interval = stratified_ci([(np.mean(differences, axis=0),)], _mean, r)
            per_seed = [float(np.mean(d)) for d in differences]
            comparisons.append(comparison(interval, "lower", per_seed, versus=other, seeds=common))
    accuracy = [
        {"arm": arm, "seed": s, "filter": f, **stratified_ci([(c["gsm8k"]["exact_match"][f],)], _mean, r).to_dict()}
        for arm, by_seed in arms.items()
        for s, c in by_seed.items()
        if "gsm8k" in c
        for f in c["gsm8k"]["exact_match"]
    ]
    primary = [c for c in comparisons if c["versus"] in ("random", "humpback")]
    first = next((c for cells in arms.values() for c in cells.values()), None)
    problems = len(first["nll"]) if first else 0
    return {"nll": rows, "comparisons": comparisons, "primary": primary, "gsm8k": accuracy} | {
        "seeds": sorted(arms.get("mutual", {})),
        "measured_on": f"{problems} GSM8K test problems, each arm on the same ones",
    }


def _difference_from_first(values: np.ndarray, first: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(values - first, axis=axis)


def _auc_difference(t: np.ndarray, s: np.ndarray, t0: np.ndarray, s0: np.ndarray, axis: int = -1) -> np.ndarray:
    return _auc(t, s, axis) - _auc(t0, s0, axis)


def claim_rounds(folder: Path, seeds: Sequence[int], r: Resampling) -> dict[str, Any]:
    """Claim 3: instruction recovery on held-out responses after k rounds, and k = K against k = 0 (paired over
    the responses, stratified by seed). Primary: ROUGE-L, K against 0."""
    cells = cells_of(folder, "main/s{seed}/rounds", seeds)
    if not cells:
        return {"by_k": [], "comparisons": [], "primary": [], "seeds": [], "measured_on": "no rounds cell yet"}
    ks = sorted(next(iter(cells.values()))["k"], key=int)
    by_k, comparisons = [], []
    for k in ks:
        at = [c["k"][k] for c in cells.values()]
        for measure in ALIGNMENTS:
            by_k.append(
                {"k": int(k), "measure": measure, **stratified_ci([(a[measure],) for a in at], _mean, r).to_dict()}
            )
        groups = [(a["true_pair_scores"], a["shuffled_pair_scores"]) for a in at]
        by_k.append({"k": int(k), "measure": "ground_truth_auc", **stratified_ci(groups, _auc, r).to_dict()})
    first, last = ks[0], ks[-1]
    for measure in ALIGNMENTS:
        groups = [(c["k"][last][measure], c["k"][first][measure]) for c in cells.values()]
        interval, per_seed = stratified_ci(groups, _difference_from_first, r), per_group(groups, _difference_from_first)
        comparisons.append(comparison(interval, "higher", per_seed, measure=measure, k=int(last), versus_k=int(first)))
    scores = ("true_pair_scores", "shuffled_pair_scores")
    groups = [tuple(c["k"][k][name] for k in (last, first) for name in scores) for c in cells.values()]
    interval, per_seed = stratified_ci(groups, _auc_difference, r), per_group(groups, _auc_difference)
    comparisons.append(
        comparison(interval, "higher", per_seed, measure="ground_truth_auc", k=int(last), versus_k=int(first))
    )
    primary = [c for c in comparisons if c["measure"] == "rouge_l"]
    measured_on = f"{_counts(cells, 'n')} held-out pool responses (per seed)"
    return {"by_k": by_k, "comparisons": comparisons, "primary": primary, "seeds": sorted(cells)} | {
        "measured_on": measured_on
    }


# -- MuSC -------------------------------------------------------------------------------------------------------


def _prompt_values(ifeval: dict[str, Any], metric: str) -> np.ndarray:
    """Per prompt: 0/1 for a prompt-level metric; the share of its instructions followed for an inst-level one."""
    return np.array([np.mean(v) if isinstance(v, list) else float(v) for v in ifeval[metric]])


def _instructions(ifeval: dict[str, Any], metric: str) -> np.ndarray:
    return np.array([len(v) if isinstance(v, list) else 1 for v in ifeval[metric]], dtype=float)


def _weighted_difference(a: np.ndarray, b: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
    """Σ n_i (a_i − b_i) / Σ n_i: the difference of two micro-averaged (inst-level) accuracies."""
    return np.sum(n * (a - b), axis=axis) / np.sum(n, axis=axis)


def _weighted_mean(a: np.ndarray, n: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sum(n * a, axis=axis) / np.sum(n, axis=axis)


def ifeval_of(cells: dict[int, dict[str, Any]], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's value averaged over the cells' seeds, and its number of instructions."""
    first = next(iter(cells.values()))["ifeval"]
    return np.mean([_prompt_values(c["ifeval"], metric) for c in cells.values()], axis=0), _instructions(first, metric)


def same_preferences(cells: Mapping[str, dict[int, dict[str, Any]]]) -> None:
    """The modes of one seed must have trained on the same preference pairs and held out the same ones (a lost
    stage cache regenerated differently would break the pairing): their survival counts must agree."""
    for seed in {s for by_seed in cells.values() for s in by_seed}:
        counts = {m: json.dumps(by_seed[seed].get("survival")) for m, by_seed in cells.items() if seed in by_seed}
        if len(set(counts.values())) > 1:
            raise ValueError(f"seed {seed}: the weight modes {sorted(counts)} saw different preference sets")


def same_prompts(policies: Mapping[str, dict[int, dict[str, Any]]]) -> None:
    """Every IFEval cell must list the same prompts in the same order: cells are paired prompt by prompt."""
    orders = {json.dumps(c["ifeval"].get("doc_ids")) for by_seed in policies.values() for c in by_seed.values()}
    if len(orders) > 1:
        raise ValueError("the IFEval cells measured different prompts (ifeval_task or ifeval_limit changed)")


def versus(
    cells: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]], label: str, r: Resampling
) -> list[dict[str, Any]]:
    """Each IFEval metric of `cells` against `other`, paired over prompts (each averaged over its seeds), and each
    seed's own difference: against the other's same seed, or against its only cell (the base policy)."""
    rows = []
    for metric in IFEVAL_METRICS:
        (a, n), (b, _) = ifeval_of(cells, metric), ifeval_of(other, metric)
        partner = {s: other.get(s, next(iter(other.values()))) for s in cells}
        per_seed = [
            _weighted_difference(ifeval_of({s: c}, metric)[0], ifeval_of({s: partner[s]}, metric)[0], n)
            for s, c in cells.items()
        ]
        interval = stratified_ci([(a, b, n)], _weighted_difference, r)
        rows.append(comparison(interval, "higher", per_seed, versus=label, measure=metric, seeds=sorted(cells)))
    return rows


def heldout_versus_none(cells: dict[int, dict[str, Any]], none: dict[int, dict[str, Any]], r: Resampling) -> Any:
    """Held-out preference accuracy (uniform token weights: one yardstick for every mode) against plain DPO's, on
    each seed's same held-out pairs."""
    groups = [
        tuple((np.array(c["heldout"]["uniform"]["margins"]) > 0).astype(float) for c in (cells[s], none[s]))
        for s in cells
    ]
    interval = stratified_ci(groups, _difference_from_first, r)
    per_seed = per_group(groups, _difference_from_first)
    return comparison(interval, "higher", per_seed, versus="none", measure="heldout_accuracy", seeds=sorted(cells))


def claim_weights(folder: Path, sizes: Any, r: Resampling) -> dict[str, Any]:
    """Claim 4: IFEval (prompt- and instruction-level, strict and loose) and held-out preference accuracy for
    each weight mode and the base policy; every mode against plain DPO (`none`), paired over IFEval prompts and
    over each seed's held-out pairs, and every policy against the base. Primary: the spec's default mode (`kl`)
    vs `none`, prompt-level strict."""
    modes = [*sizes.headline_modes, *sizes.ablation_modes]
    cells = {m: cells_of(folder, f"musc/s{{seed}}/{m}", sizes.seeds) for m in modes}
    cells = {m: c for m, c in cells.items() if c}
    base = read_cell(folder, "musc/base/ifeval")
    policies = {**({"base": {0: base}} if base else {}), **cells}
    same_preferences(cells)
    same_prompts(policies)
    rows, comparisons = [], []
    for label, by_seed in policies.items():
        for metric in IFEVAL_METRICS:
            values, n = ifeval_of(by_seed, metric)
            interval = stratified_ci([(values, n)], _weighted_mean, r)
            rows.append({"policy": label, "metric": metric, "seeds": sorted(by_seed), **interval.to_dict()})
    for mode, by_seed in cells.items():
        if base:
            comparisons += [{"mode": mode, **c} for c in versus(by_seed, {0: base}, "base", r)]
        common = {s: c for s, c in by_seed.items() if s in cells.get("none", {})}
        if mode != "none" and common:
            comparisons += [{"mode": mode, **c} for c in versus(common, cells["none"], "none", r)]
            comparisons.append({"mode": mode, **heldout_versus_none(common, cells["none"], r)})
    heldout = [
        {"mode": m, "seed": s, "pairs": len(c["heldout"]["uniform"]["margins"])}
        | {kind: c["heldout"][kind]["accuracy"] for kind in ("uniform", "weighted")}
        for m, by_seed in cells.items()
        for s, c in by_seed.items()
    ]
    primary = [
        c for c in comparisons if (c["mode"], c["versus"], c["measure"]) == ("kl", "none", "prompt_level_strict_acc")
    ]
    prompts = len(base["ifeval"][IFEVAL_METRICS[0]]) if base else 0
    measured_on = f"{prompts} IFEval prompts ({sizes.ifeval_task}), max_gen_toks {sizes.max_gen_toks} in every cell"
    return {"ifeval": rows, "heldout": heldout, "comparisons": comparisons, "primary": primary} | {
        "measured_on": measured_on
    }


# -- the written results ----------------------------------------------------------------------------------------

CLAIMS = {
    "claim_1": "mutual filtering selects better-aligned pairs (ROUGE-L of the kept half, mutual-pmi vs baseline)",
    "claim_2": "better-selected data trains a better forward model (GSM8K test NLL, mutual vs arm; lower is better)",
    "claim_3": "mutual-alignment rounds help (held-out instruction recovery, ROUGE-L at k = K vs k = 0)",
    "claim_4": "token weights beat uniform DPO (IFEval prompt-level strict, kl vs none)",
}


def study_time(folder: Path) -> dict[str, Any]:
    """How many invocations the study took, the compute its finished cells took, and its wall time: each
    invocation from its start to the last cell it finished (a cell lost to a kill is not counted)."""
    log = folder.parent / "invocations.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    starts = sorted(json.loads(line)["started"] for line in lines)
    cells = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.rglob("*.json"))]
    wall = 0.0
    ends = [*starts[1:], "9999"] if starts else []  # an invocation's cells finished before the next one started
    for start, end in zip(starts, ends, strict=True):
        finished = [c["finished"] for c in cells if start <= c.get("finished", "") < end]
        if finished:
            wall += (datetime.fromisoformat(max(finished)) - datetime.fromisoformat(start)).total_seconds()
    return {
        "invocations": len(starts),
        "cells": len(cells),
        "cell_seconds": sum(c.get("seconds", 0) for c in cells),
        "wall_seconds": wall,
    }


def cell_costs(folder: Path) -> list[dict[str, Any]]:
    """Minutes per kind of cell (its name without the seed), for the README's cost column: a seed's first MuSC
    mode also builds that seed's preference pairs, and seed 0's MAIN arms also measure GSM8K accuracy."""
    minutes: dict[str, list[float]] = {}
    for path in sorted(folder.rglob("*.json")):
        name = re.sub(r"/s\d+/", "/s*/", path.relative_to(folder).with_suffix("").as_posix())
        minutes.setdefault(name, []).append(json.loads(path.read_text(encoding="utf-8")).get("seconds", 0) / 60)
    return [
        {"cell": name, "cells": len(m), "minutes": f"{min(m):.1f}" if len(m) == 1 else f"{min(m):.1f}-{max(m):.1f}"}
        for name, m in minutes.items()
    ]


def verdict_rows(main: Mapping[str, Any], musc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per primary comparison, as the README's Results table states them."""
    rows = []
    for key, claim in (*((k, main[k]) for k in ("claim_1", "claim_2", "claim_3")), ("claim_4", musc["claim_4"])):
        for c in claim["primary"]:
            versus = c.get("versus") or f"k={c.get('versus_k')}"
            rows.append(
                {
                    "claim": key,
                    "comparison": versus,
                    "difference": f"{c['estimate']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]",
                    "verdict": c["verdict"],
                    "seeds": ", ".join(map(str, c.get("seeds") or claim.get("seeds") or [])),
                    "measured on": claim["measured_on"],
                }
            )
    return rows


def write_results(profile: str, root: Path = Path(), resampling: Resampling | None = None) -> list[Path]:
    """results/study/{main,musc}.json, the four figures and summary.md from the profile's cells (the committed
    `cpu` profile writes to results/study/, any other to results/study/<profile>/)."""
    from mainlib.plots import save_figure
    from mainlib.results import markdown_table, write_json
    from mainlib.study import figures
    from mainlib.study.spec import FILES, load_spec

    resampling = resampling or Resampling()
    specs = {s: load_spec(root / "sweeps" / FILES[s], profile) for s in FILES}
    folder = root / "results" / "study" / profile / "cells"
    out = root / "results" / "study" / ("" if profile == "cpu" else profile)
    sizes = specs["main"].sizes
    main = {
        "claim_1": claim_selection(folder, sizes.seeds, sizes.top_fractions, resampling),
        "claim_2": claim_training(folder, sizes.seeds, resampling),
        "claim_3": claim_rounds(folder, sizes.seeds, resampling),
    }
    musc = {"claim_4": claim_weights(folder, specs["musc"].sizes, resampling)}
    context = {"profile": profile, "time": study_time(folder), "costs": cell_costs(folder), "claims": CLAIMS}
    paths = [
        write_json(out / f"{s}.json", {**claims, **context, "sizes": asdict(specs[s].sizes), "config": specs[s].config})
        for s, claims in (("main", main), ("musc", musc))
    ]
    for name, fig in (
        ("claim_1", figures.selection_figure(main["claim_1"])),
        ("claim_2", figures.training_figure(main["claim_2"])),
        ("claim_3", figures.rounds_figure(main["claim_3"])),
        ("claim_4", figures.weights_figure(musc["claim_4"])),
    ):
        paths += save_figure(fig, out / "figures", name)
    summary = [f"# Reference study ({profile})\n", markdown_table(verdict_rows(main, musc)), ""]
    summary += [f"- **{k}**: {v}" for k, v in CLAIMS.items()]
    time = context["time"]
    summary.append(
        f"\n{time['cells']} cells, {time['cell_seconds'] / 3600:.2f} h of cell compute, "
        f"{time['wall_seconds'] / 3600:.2f} h wall time over {time['invocations']} invocations."
    )
    summary += ["\nWhat each kind of cell took (minutes):\n", markdown_table(context["costs"])]
    (out / "summary.md").write_text("\n".join(summary) + "\n", encoding="utf-8")
    return [*paths, out / "summary.md"]
