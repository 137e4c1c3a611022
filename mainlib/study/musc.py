"""MuSC's claim as cells (`runs/study/<profile>/musc_s<seed>/musc/`):

    musc/base/ifeval         the starting policy on the study's IFEval (the reference for every cell)
    musc/s<seed>/<mode>      one preference set per seed (stage-cached, shared by the modes), tdpo with
                             `weight_mode` on all but the held-out pairs, held-out preference accuracy, IFEval

The weight modes of one seed train on the same preference pairs and the same held-out split: only the token
weights differ. IFEval runs lm-eval's metrics on a fixed prompt subset with one generation cap for every cell,
and each cell keeps every prompt's results, so `report` pairs cells prompt by prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mainlib import data, evaluate
from mainlib.config import MuscConfig
from mainlib.musc.constraints import study_instructions
from mainlib.musc.pipeline import run_musc
from mainlib.study.cells import Cell
from mainlib.study.spec import MuscSizes, StudySpec

IFEVAL_METRICS = ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc", "inst_level_loose_acc")


def musc_cells(spec: StudySpec, runs: Path) -> list[Cell]:
    """The base policy's IFEval, then each seed's headline modes (and the first seed's ablation modes)."""
    sizes: MuscSizes = spec.sizes
    if "instructions" not in spec.config:  # the study's own set: every Self-Instruct task, constraints drawn
        spec.config["instructions"] = str(runs / "complex_instructions.jsonl")
        if not Path(spec.config["instructions"]).is_file():
            study_instructions(spec.config["instructions"])
    base = spec.build(runs_dir=str(runs))
    cells = [Cell("musc/base/ifeval", lambda: {"ifeval": ifeval(base.model, None, runs / "ifeval" / "base", sizes)})]
    for number, seed in enumerate(sizes.seeds):
        for mode in sizes.headline_modes + (sizes.ablation_modes if number == 0 else []):
            config = spec.build(seed=seed, weight_mode=mode, runs_dir=str(runs), run_name=f"musc_s{seed}")
            compute = lambda c=config: policy_cell(c, sizes, runs / "ifeval" / f"s{c.seed}_{c.weights.mode}")  # noqa: E731
            cells.append(Cell(f"musc/s{seed}/{mode}", compute, "claim 4"))
    return cells


def policy_cell(config: MuscConfig, sizes: MuscSizes, folder: Path) -> dict[str, Any]:
    """Train (or resume) the policy of one (seed, mode) and measure it: held-out accuracy, then IFEval."""
    if not config.heldout_fraction:
        raise ValueError("the study's MuSC cells measure held-out accuracy: set heldout_fraction in the profile")
    state = run_musc(config)
    if state.heldout is None:
        pairs = len(state.preferences)
        raise ValueError(
            f"musc_s{config.seed}: {pairs} preference pairs survived, none held out at heldout_fraction = "
            f"{config.heldout_fraction}; raise n or response_max_new_tokens in the profile (see the survival counts)"
        )
    return {
        "seed": config.seed,
        "mode": config.weights.mode,
        "survival": state.survival(),
        "pairs": len(state.preferences),
        "training": state.training.to_dict() if state.training else None,
        "heldout": state.heldout,
        "ifeval": ifeval(config.model, str(state.adapter_dir), folder, sizes),
    }


def ifeval(model: str, adapter: str | None, folder: Path, sizes: MuscSizes) -> dict[str, Any]:
    """lm-eval's IFEval metrics (chat template, `max_gen_toks` cap) and each prompt's: requests cached in the
    study's lm-eval cache, so an interrupted cell resumes where it stopped."""
    runs = folder.parent.parent
    rows = evaluate.evaluate(
        model, adapter, [sizes.ifeval_task], data="full", limit=sizes.ifeval_limit, apply_chat_template=True,
        max_gen_toks=sizes.max_gen_toks, cache_dir=str(runs / "lm_eval_cache"), samples_dir=str(folder),
        results_dir=str(runs / "eval"), run_name=folder.name,
    )  # fmt: skip
    samples = data.load_jsonl(next(folder.glob(f"*__{sizes.ifeval_task}.jsonl")))
    per_prompt = {m: [s[m] for s in samples] for m in IFEVAL_METRICS}
    return {
        "summary": [{k: r.get(k) for k in ("metric", "value", "stderr", "n", "max_gen_toks")} for r in rows],
        "doc_ids": [s["doc_id"] for s in samples],
        **per_prompt,
    }
