"""The reference study's machinery: study files, cells, the stratified bootstrap, the claims' reports, and the
inputs it builds (IFEval subset, GSM8K solutions, the larger complex-instruction set)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mainlib import benchmarks
from mainlib.config import ConfigError
from mainlib.stats import Interval, Resampling, alignment_auc_ci, stratified_ci
from mainlib.study import report
from mainlib.study.cells import Cell, progress, read_cell, run_cells
from mainlib.study.spec import MuscSizes, load_spec

REPO = Path(__file__).resolve().parents[1]
FAST = Resampling(n_resamples=2000)


def write_study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


# -- study files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("study", ["main", "musc"])
@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_the_committed_study_files_load(study: str, profile: str) -> None:
    spec = load_spec(REPO / "sweeps" / f"study_{study}.yaml", profile)
    assert spec.study == study and spec.sizes.seeds


def test_study_file_mistakes_name_the_file_and_what_is_allowed(tmp_path: Path) -> None:
    body = "study: main\nprofiles:\n  smoke:\n    config: {n_pool: 8}\n    sizes: {seeds: [0]}\n"
    with pytest.raises(ValueError, match="no profile 'cpu'; it has smoke"):
        load_spec(write_study(tmp_path, body), "cpu")
    with pytest.raises(ValueError, match="'study' must be one of main, musc"):
        load_spec(write_study(tmp_path, body.replace("study: main", "study: both")), "smoke")
    with pytest.raises(ConfigError, match="seedz"):
        load_spec(write_study(tmp_path, body.replace("seeds:", "seedz:")), "smoke")
    with pytest.raises(ConfigError, match=r"arm_fraction.*\(0, 1\]"):
        load_spec(write_study(tmp_path, body.replace("seeds: [0]", "arm_fraction: 1.5")), "smoke")
    with pytest.raises(ConfigError, match="n_pol"):  # a config name the recipe does not know, before any cell runs
        load_spec(write_study(tmp_path, body.replace("n_pool", "n_pol")), "smoke")
    with pytest.raises(ValueError, match="unknown fields \\['setup'\\]"):
        load_spec(write_study(tmp_path, body.replace("    config:", "    setup: 1\n    config:")), "smoke")


# -- cells ----------------------------------------------------------------------------------------------------------


def test_cells_run_once_in_order_and_a_failed_cell_leaves_no_file(tmp_path: Path) -> None:
    ran: list[str] = []

    def make(name: str, fail: bool = False) -> Cell:
        def compute() -> dict:
            ran.append(name)
            if fail:
                raise RuntimeError("killed")
            return {"value": len(name)}

        return Cell(name, compute)

    cells = [make("a/one"), make("a/two", fail=True), make("b/three")]
    with pytest.raises(RuntimeError):
        run_cells(tmp_path, cells, log=lambda _: None)
    assert ran == ["a/one", "a/two"]
    assert progress(tmp_path, cells) == (["a/one"], ["a/two", "b/three"])
    cells[1] = make("a/two")
    lines: list[str] = []
    run_cells(tmp_path, cells, log=lines.append)
    assert ran == ["a/one", "a/two", "a/two", "b/three"]  # the finished cell is not run again
    assert lines[0].startswith("study: 1 of 3 cells done, 2 to run")
    cell = read_cell(tmp_path, "b/three")
    assert cell["value"] == len("b/three") and cell["seconds"] >= 0 and cell["finished"].endswith("+00:00")


# -- the stratified bootstrap and verdicts --------------------------------------------------------------------------


def test_study_wall_time_counts_each_invocation_up_to_its_last_finished_cell(tmp_path: Path) -> None:
    folder = tmp_path / "cells"
    starts = ["2026-12-03T10:00:00+00:00", "2026-12-03T12:00:00+00:00"]
    (tmp_path / "invocations.jsonl").write_text("".join(json.dumps({"started": s}) + "\n" for s in starts))
    finished = {"a": "2026-12-03T10:30:00+00:00", "b": "2026-12-03T11:00:00+00:00", "c": "2026-12-03T12:10:00+00:00"}
    for name, when in finished.items():  # the first invocation was killed after b, in a cell that left no file
        (folder / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps({"seconds": 60.0, "finished": when}))
    time = report.study_time(folder)
    assert time == {"invocations": 2, "cells": 3, "cell_seconds": 180.0, "wall_seconds": 3600.0 + 600.0}


def test_cell_costs_group_the_seeds_of_each_kind_of_cell(tmp_path: Path) -> None:
    for name, seconds in {"main/s0/pipeline": 60, "main/s1/pipeline": 180, "musc/base/ifeval": 30}.items():
        (tmp_path / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{name}.json").write_text(json.dumps({"seconds": seconds}))
    assert report.cell_costs(tmp_path) == [
        {"cell": "main/s*/pipeline", "cells": 2, "minutes": "1.0-3.0"},
        {"cell": "musc/base/ifeval", "cells": 1, "minutes": "0.5"},
    ]


def test_stratified_interval_weights_groups_equally_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.0, 1.0, 50), rng.normal(1.0, 1.0, 5000)
    estimate, low, high = stratified_ci([(small,), (large,)], report._mean, FAST)
    assert estimate == pytest.approx((small.mean() + large.mean()) / 2)  # not the pooled mean (~0.99)
    # the groups' means vary independently: var = (1/50 + 1/5000) / 4 -> sd ~ 0.071, 95% half-width ~ 0.14
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt((1 / 50 + 1 / 5000) / 4), rel=0.15)
    assert low < estimate < high
    constant = stratified_ci([(np.ones(10),), (np.zeros(7),)], report._mean, FAST)
    assert constant == Interval(0.5, 0.5, 0.5)


def test_paired_bootstrap_over_items_of_a_known_difference() -> None:
    rng = np.random.default_rng(1)
    item = rng.normal(0.0, 5.0, 400)  # large item effects, which pairing cancels
    a, b = item + 0.3 + rng.normal(0.0, 0.1, 400), item + rng.normal(0.0, 0.1, 400)
    estimate, low, high = stratified_ci([(a, b)], report._difference_from_first, FAST)
    assert estimate == pytest.approx(0.3, abs=0.03) and 0.25 < low < estimate < high < 0.35
    assert report.verdict(Interval(estimate, low, high)) == "held"
    assert report.verdict(Interval(estimate, low, high), better="lower") == "not held"
    assert report.verdict(Interval(0.1, -0.2, 0.4)) == "inconclusive"
    # the interval resamples items, not training runs: one seed against the rest leaves it inconclusive
    assert report.verdict(Interval(estimate, low, high), per_seed=[0.3, 0.5]) == "held"
    assert report.verdict(Interval(estimate, low, high), per_seed=[0.6, -0.1]) == "inconclusive"


def test_paired_samples_of_unequal_length_are_refused() -> None:
    with pytest.raises(ValueError, match="group 1 is uneven"):
        stratified_ci([(np.ones(3), np.ones(3)), (np.ones(3), np.ones(4))], report._difference_from_first, FAST)


def test_above_median_auc_matches_the_library_auc_with_ties() -> None:
    rng = np.random.default_rng(2)
    alignment = rng.normal(size=200)
    score = np.round(alignment + rng.normal(size=200))  # integer scores: many ties, as Humpback's ratings
    vectorised = stratified_ci([(score, alignment)], report._above_median_auc, FAST).estimate
    assert vectorised == pytest.approx(alignment_auc_ci(score, alignment, FAST).estimate)
    assert report._above_median_auc(alignment, alignment) == 1.0


def test_inst_level_difference_is_the_difference_of_micro_averages() -> None:
    a = {"m": [[True, True], [False], [True, False, False]]}
    b = {"m": [[True, False], [False], [False, False, False]]}
    va, n = report._prompt_values(a, "m"), report._instructions(a, "m")
    vb = report._prompt_values(b, "m")
    assert report._weighted_difference(va, vb, n) == pytest.approx(3 / 6 - 1 / 6)


# -- the claims on hand-made cells ----------------------------------------------------------------------------------


def selection_cell(seed: int, n: int = 200) -> dict:
    """Mutual-pmi ranks by the alignment plus noise; random and Humpback know nothing of it."""
    rng = np.random.default_rng(seed)
    rouge = rng.uniform(size=n)
    noise = {name: rng.normal(size=n) for name in report.FILTERS}
    scores = {name: list(noise[name]) for name in report.FILTERS}
    scores["mutual_pmi"] = list(rouge + 0.1 * noise["mutual_pmi"])
    scores["humpback"] = list(rng.integers(1, 6, size=n).astype(float))
    return {"n": n, "rouge_l": list(rouge), "true_loglik": list(-rouge), "scores": scores}


def test_claim_one_holds_for_a_filter_that_sees_the_alignment(tmp_path: Path) -> None:
    folder = tmp_path / "cells"
    run_cells(folder, [Cell(f"main/s{s}/selection", lambda s=s: selection_cell(s)) for s in (0, 1, 2)], log=print)
    claim = report.claim_selection(folder, [0, 1, 2], [0.25, 0.5], FAST)
    assert claim["seeds"] == [0, 1, 2]
    primary = {c["versus"]: c for c in claim["primary"]}
    assert set(primary) == {"random", "humpback"}
    # top half of uniform(0, 1) by (nearly) the alignment itself: mean ~0.75; random's half: ~0.5
    assert primary["random"]["estimate"] == pytest.approx(0.25, abs=0.05)
    assert all(c["verdict"] == "held" for c in primary.values())
    loglik = [c for c in claim["comparisons"] if c["alignment"] == "true_loglik"]
    assert all(c["verdict"] == "not held" for c in loglik)  # mutual keeps the pairs of *lowest* log-likelihood here
    auc = {(a["alignment"], a["filter"]): a for a in claim["auc"]}
    assert auc[("rouge_l", "mutual_pmi")]["estimate"] > 0.95
    assert auc[("rouge_l", "random")]["low"] < 0.5 < auc[("rouge_l", "random")]["high"]


def test_cpu_study_runs_ablation_arms_and_rounds_with_the_first_seed_only(tmp_path: Path) -> None:
    from mainlib.study.main import main_cells

    spec = load_spec(REPO / "sweeps" / "study_main.yaml", "cpu")
    arms = [c.name for c in main_cells(spec, tmp_path, tmp_path) if "/arm_" in c.name]
    assert [a for a in arms if a.startswith("main/s0/")] == [f"main/s0/arm_{a}" for a in report.ARMS]
    assert [a.split("/arm_")[1] for a in arms if a.startswith("main/s2/")] == ["random", "humpback", "mutual"]
    assert [c.name for c in main_cells(spec, tmp_path, tmp_path) if c.name.endswith("/rounds")] == ["main/s0/rounds"]
    gpu = load_spec(REPO / "sweeps" / "study_main.yaml", "gpu")
    assert len([c for c in main_cells(gpu, tmp_path, tmp_path) if "/arm_" in c.name]) == 15


def test_claim_two_pairs_each_arm_with_mutual_on_the_seeds_both_ran(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.3, 50)  # each problem's difficulty, shared by every arm and seed

    def arm(name: str, seed: int) -> dict:
        shift = {"mutual": 0.0, "random": 0.1, "seed_only": -0.1}[name]
        return {"arm": name, "nll": list(base + shift + rng.normal(0, 0.01, 50) + 0.05 * seed)}

    cells = [Cell(f"main/s{s}/arm_{a}", lambda a=a, s=s: arm(a, s)) for s in (0, 1, 2) for a in ("random", "mutual")]
    cells.append(Cell("main/s0/arm_seed_only", lambda: arm("seed_only", 0)))
    run_cells(tmp_path, cells, log=print)
    claim = report.claim_training(tmp_path, [0, 1, 2], FAST)
    by_arm = {r["arm"]: r for r in claim["nll"]}
    assert by_arm["seed_only"]["seeds"] == [0] and by_arm["mutual"]["seeds"] == [0, 1, 2]
    versus = {c["versus"]: c for c in claim["comparisons"]}
    assert versus["random"]["seeds"] == [0, 1, 2] and versus["random"]["verdict"] == "held"
    assert versus["random"]["estimate"] == pytest.approx(-0.1, abs=0.01)
    # seed_only against mutual's seed 0 only (seed 1 and 2 would add 0.05 and 0.1 to mutual's NLL)
    assert versus["seed_only"]["seeds"] == [0] and versus["seed_only"]["estimate"] == pytest.approx(0.1, abs=0.01)
    assert versus["seed_only"]["verdict"] == "not held" and claim["seeds"] == [0, 1, 2]


def test_claim_four_pairs_prompts_and_reports_every_mode(tmp_path: Path) -> None:
    def ifeval(followed: list[bool]) -> dict:
        return {
            "doc_ids": list(range(len(followed))),
            **{m: [[f] if m.startswith("inst") else f for f in followed] for m in report.IFEVAL_METRICS},
        }

    def policy(mode: str, seed: int) -> dict:
        followed = [i % 4 != 0 for i in range(120)] if mode == "kl" else [i % 2 == 0 for i in range(120)]
        margins = [1.0] * 20 if mode == "kl" else [1.0, -1.0] * 10
        return {
            "ifeval": ifeval(followed),
            "heldout": {k: {"margins": margins, "accuracy": 0.0} for k in ("uniform", "weighted")},
        }

    cells = [Cell("musc/base/ifeval", lambda: {"ifeval": ifeval([False] * 120)})]
    cells += [Cell(f"musc/s{s}/{m}", lambda m=m, s=s: policy(m, s)) for s in (0, 1) for m in ("none", "kl")]
    run_cells(tmp_path, cells, log=print)
    sizes = MuscSizes(seeds=[0, 1], ablation_modes=[])
    claim = report.claim_weights(tmp_path, sizes, FAST)
    [primary] = claim["primary"]
    assert primary["estimate"] == pytest.approx(0.75 - 0.5) and primary["verdict"] == "held"
    assert primary["seeds"] == [0, 1]
    heldout = next(c for c in claim["comparisons"] if c["measure"] == "heldout_accuracy")
    assert heldout["estimate"] == pytest.approx(0.5)
    base = next(r for r in claim["ifeval"] if r["policy"] == "base" and r["metric"] == "prompt_level_strict_acc")
    assert base["estimate"] == 0.0
    kl_vs_base = next(c for c in claim["comparisons"] if (c["mode"], c["versus"], c["measure"]) == (
        "kl", "base", "prompt_level_strict_acc"))  # fmt: skip
    assert kl_vs_base["estimate"] == pytest.approx(0.75) and kl_vs_base["per_seed"] == pytest.approx([0.75, 0.75])


def test_claim_four_refuses_modes_that_saw_different_preference_pairs(tmp_path: Path) -> None:
    def policy(pairs: int) -> dict:
        ifeval = {"doc_ids": [0, 1], **{m: [True, False] for m in report.IFEVAL_METRICS}}
        heldout = {k: {"margins": [1.0] * pairs, "accuracy": 1.0} for k in ("uniform", "weighted")}
        return {"ifeval": ifeval, "heldout": heldout, "survival": [{"step": "tdpo", "left": pairs}]}

    run_cells(tmp_path, [Cell("musc/s0/none", lambda: policy(5)), Cell("musc/s0/kl", lambda: policy(6))], log=print)
    with pytest.raises(ValueError, match="seed 0: the weight modes"):
        report.claim_weights(tmp_path, MuscSizes(seeds=[0], ablation_modes=[]), FAST)


# -- the study's inputs ---------------------------------------------------------------------------------------------


def test_ifeval_subset_is_stratified_by_instruction_group() -> None:
    groups = ["punctuation"] * 30 + ["keywords"] * 50 + ["language"] * 20
    rows = [{"key": 1000 + i, "instruction_id_list": [f"{g}:x", "other:y"]} for i, g in enumerate(groups)]
    keys = benchmarks.stratified_ifeval_keys(rows, 50, seed=0)
    chosen = [groups[k - 1000] for k in keys]
    assert len(keys) == 50 and keys == sorted(keys) and len(set(keys)) == 50
    assert (chosen.count("punctuation"), chosen.count("keywords"), chosen.count("language")) == (15, 25, 10)
    assert keys == benchmarks.stratified_ifeval_keys(rows, 50, seed=0) != benchmarks.stratified_ifeval_keys(rows, 50, 1)
    odd = benchmarks.stratified_ifeval_keys(rows, 7, seed=0)  # shares 2.1, 3.5, 1.4: the largest remainder rounds up
    assert [groups[k - 1000] for k in odd].count("keywords") == 4 and len(odd) == 7


def test_the_committed_ifeval_subset_is_the_function_of_the_full_set() -> None:
    full = Path(__import__("os").environ.get("MAINLIB_DATA_DIR", "/nonexistent")) / "ifeval_input_data.jsonl"
    if not full.is_file():
        pytest.skip("needs the full IFEval file ($MAINLIB_DATA_DIR)")
    rows = [json.loads(line) for line in full.read_text().splitlines() if line.strip()]
    committed = json.loads(benchmarks.IFEVAL_SUBSET.read_text())["keys"]
    assert committed == benchmarks.stratified_ifeval_keys(rows, 272, seed=0)
    assert len(benchmarks.ifeval_subset("full")["train"]) == 272


def test_gsm8k_solution_reads_like_the_pool() -> None:
    answer = "He has 3 + 4 = <<3+4=7>>7 apples.\nSo 7 * 2 = <<7*2=14>>14.\n#### 14"
    assert benchmarks.gsm8k_solution(answer) == "He has 3 + 4 = 7 apples.\nSo 7 * 2 = 14.\nThe final answer is 14."


def test_study_instructions_give_every_task_its_own_constraints(tmp_path: Path, monkeypatch) -> None:
    from mainlib.musc.constraints import CONSTRAINTS, study_instructions
    from mainlib.musc.pipeline import load_instructions

    for name, prefix in (
        ("self_instruct_seed_tasks.jsonl", "seed"),
        ("self_instruct_user_oriented_instructions.jsonl", "user"),
    ):
        tasks = [
            {"id": f"{prefix}_{i}", "instruction": f"Task {prefix} {i}.", "instances": [{"input": "", "output": "x"}]}
            for i in range(3)
        ]
        (tmp_path / name).write_text("".join(json.dumps(t) + "\n" for t in tasks))
    monkeypatch.setenv("MAINLIB_DATA_DIR", str(tmp_path))
    path = study_instructions(tmp_path / "out" / "complex.jsonl", seed=0)
    records = load_instructions(str(path))
    assert [r["id"] for r in records] == [f"study_{i:03d}" for i in range(6)]
    assert [r["source"] for r in records][::3] == ["self_instruct_seed:seed_0", "self_instruct_user_oriented:user_0"]
    bank = {text.split("{")[0] for texts in CONSTRAINTS.values() for text in texts}
    for r in records:
        assert 2 <= len(r["constraints"]) <= 4 and r["instruction"].startswith(r["task"])
        assert all(any(c.startswith(prefix) for prefix in bank) for c in r["constraints"])
    assert path.read_bytes() == study_instructions(tmp_path / "again.jsonl", seed=0).read_bytes()


def hand_made_study(root: Path) -> None:
    """Every cell of the smoke profile, made by hand: mutual sees the alignment, rounds help, kl beats none."""
    (root / "sweeps").symlink_to(REPO / "sweeps")
    rng = np.random.default_rng(3)

    def rounds() -> dict:
        k = {}
        for step in range(2):  # smoke: one round, k = 0 and 1
            true = rng.normal(size=40) + step
            k[str(step)] = {
                "rouge_l": list(rng.uniform(size=40) * 0.2 + 0.3 * step),
                "true_loglik": list(rng.normal(size=40) - 1 + step),
                "true_pair_scores": list(true),
                "shuffled_pair_scores": list(rng.normal(size=40)),
            }
        return {"n": 40, "k": k}

    def arm(name: str) -> dict:
        shift = {"mutual": 0.0, "random": 0.2}.get(name, 0.1)
        return {
            "arm": name,
            "nll": list(1.0 + shift + rng.normal(0, 0.05, 30)),
            "gsm8k": {"exact_match": {"strict-match": [0.0, 1.0]}},
        }

    def ifeval(share: int) -> dict:
        followed = [i % share != 0 for i in range(60)]
        return {m: [[f] if m.startswith("inst") else float(f) for f in followed] for m in report.IFEVAL_METRICS}

    def policy(mode: str) -> dict:
        margins = [1.0] * 8 if mode == "kl" else [1.0, -1.0] * 4
        heldout = {k: {"margins": margins, "accuracy": 0.0} for k in ("uniform", "weighted")}
        return {"ifeval": ifeval(4 if mode == "kl" else 2), "heldout": heldout}

    cells = [Cell("main/s0/selection", lambda: selection_cell(0)), Cell("main/s0/rounds", rounds)]
    cells += [Cell(f"main/s0/arm_{a}", lambda a=a: arm(a)) for a in report.ARMS]
    cells += [Cell("musc/base/ifeval", lambda: {"ifeval": ifeval(1)})]
    cells += [Cell(f"musc/s0/{m}", lambda m=m: policy(m)) for m in ("none", "kl")]
    run_cells(root / "results" / "study" / "smoke" / "cells", cells, log=print)


@pytest.mark.slow
def test_notebook_07_reports_every_claim_with_intervals(tmp_path: Path) -> None:
    from tests.test_notebooks import run_notebook

    hand_made_study(tmp_path)
    executed = run_notebook("07_study.ipynb", tmp_path, profile="smoke", root=str(tmp_path), n_resamples=500)
    out = tmp_path / "results" / "study" / "smoke"
    main, musc = (json.loads((out / f"{s}.json").read_text()) for s in ("main", "musc"))
    verdicts = {(c["claim"], c["comparison"]): c["verdict"] for c in report.verdict_rows(main, musc)}
    assert verdicts == {
        ("claim_1", "random"): "held",
        ("claim_1", "humpback"): "held",
        ("claim_2", "random"): "held",  # mutual's NLL 0.2 below random's
        ("claim_2", "humpback"): "held",
        ("claim_3", "k=0"): "held",
        ("claim_4", "none"): "held",
    }
    assert main["time"]["cells"] == 10 and main["sizes"]["seeds"] == [0]
    for claim in ("claim_1", "claim_2", "claim_3", "claim_4"):
        assert (out / "figures" / f"{claim}.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "| claim_4 | none |" in summary and "held" in summary
    assert "60 IFEval prompts (mainlib_ifeval_subset), max_gen_toks 32" in summary  # the cap beside every IFEval number
    shown = "".join(
        str(o.get("data", {}).get("text/markdown", "")) for c in executed.cells for o in c.get("outputs", [])
    )
    assert "Reference study (smoke)" in shown


def test_the_readme_states_the_committed_study_verdicts() -> None:
    """The README's Results table is the committed study's, row for row (notebook 07 writes summary.md)."""
    summary = (REPO / "results" / "study" / "summary.md").read_text(encoding="utf-8")
    rows = [line for line in summary.splitlines() if line.startswith("| claim_")]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(rows) == 6  # claims 1 and 2: mutual vs random and vs Humpback; 3: k = 2 vs 0; 4: kl vs none
    assert [row for row in rows if row not in readme] == []
