"""MAIN's claims as cells, one pipeline per seed (`runs/study/<profile>/main_s<seed>/`, K = `rounds`):

    main/s<seed>/pipeline    inputs .. score: the K-round adapters' synthetic pool, scored (stage-cached)
    main/s<seed>/selection   claim 1: each synthetic pair's score under every filter and its truth alignment
    main/s<seed>/rounds      claim 3: the reverse model after k = 0..K rounds, on pool responses outside the pool
                             (the seeds in `rounds_seeds`)
    main/s<seed>/arm_<arm>   claim 2: a final SFT on seed ∪ the arm's pairs, then GSM8K test NLL (and accuracy);
                             the headline arms with every seed, the ablation arms with the first only

Every filter ranks the same candidates (the K-round reverse model's instructions for the run's pool), so a
difference between filters is the filter's alone; Humpback enters as its self-curation (the seed-only forward
model's 1-5 rating). Its other half, writing instructions with the seed-only reverse model, is claim 3's k = 0.
Each cell stores per-item values, so `report` can draw every interval from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path
from typing import Any

from mainlib import data, evaluate, generate, mutual, sft
from mainlib.adapters import ModelBank
from mainlib.benchmarks import gsm8k, gsm8k_solution
from mainlib.config import MainConfig
from mainlib.data import Pair
from mainlib.models import load_tokenizer
from mainlib.pipeline import PipelineState, aligned_stage, final_settings, run_main
from mainlib.scoring import score_pairs
from mainlib.study.cells import Cell, read_cell
from mainlib.study.spec import MainSizes, StudySpec
from mainlib.truth import reference_instructions, rouge_l, true_instruction_loglik

FILTERS = [f"{m}_{n}" for m in ("mutual", "forward", "reverse") for n in ("pmi", "none")] + ["humpback", "random"]
ARMS = ("seed_only", "unfiltered", "random", "humpback", "mutual")  # claim 2; mutual: the config's normalisation


def main_cells(spec: StudySpec, runs: Path, cells_dir: Path) -> list[Cell]:
    """Every MAIN cell of the profile, in the order they run (each seed's pipeline first)."""
    sizes: MainSizes = spec.sizes
    cells = []
    for number, seed in enumerate(sizes.seeds):
        config = spec.build(seed=seed, runs_dir=str(runs), run_name=f"main_s{seed}", filter_method="mutual")
        where = f"main/s{seed}"
        cells += [
            Cell(f"{where}/pipeline", lambda c=config: pipeline_cell(c), "claims 1-3: the pipeline"),
            Cell(f"{where}/selection", lambda c=config: selection_cell(c), "claim 1"),
        ]
        if seed in sizes.rounds_seeds:
            cells.append(Cell(f"{where}/rounds", lambda c=config: rounds_cell(c, sizes), "claim 3"))
        chosen = sizes.headline_arms + (sizes.ablation_arms if number == 0 else [])
        for arm in [a for a in ARMS if a in chosen]:
            compute = lambda c=config, a=arm, w=where: arm_cell(c, sizes, a, read_cell(cells_dir, f"{w}/selection"))  # noqa: E731
            cells.append(Cell(f"{where}/arm_{arm}", compute, "claim 2"))
    return cells


# -- shared pieces ----------------------------------------------------------------------------------------------


def run_to_score(config: MainConfig) -> PipelineState:
    return run_main(config, until="score")


def bank_of(config: MainConfig) -> tuple[ModelBank, Any]:
    return ModelBank(config.model, config.quantization), load_tokenizer(config.model)


def stage_dir(config: MainConfig, k: int) -> Path:
    """The folder holding the adapters after k rounds."""
    return Path(config.runs_dir) / config.run_name / aligned_stage(config, k)


def pool_file(config: MainConfig) -> Path:
    spec = config.pool_data
    if spec.startswith("bundled:"):
        return data.bundled_path(data.BUNDLED_FILES[spec.removeprefix("bundled:")])
    return Path(spec)


def true_instructions(config: MainConfig, pairs: list[Pair]) -> list[str]:
    """The instruction each pair's response really answers (the pool's `reference_instruction`)."""
    truth = reference_instructions(pool_file(config))
    missing = [p.source for p in pairs if p.source not in truth]
    if missing:
        raise ValueError(f"{config.pool_data}: no reference_instruction for {len(missing)} rows, e.g. {missing[0]!r}")
    return [truth[p.source] for p in pairs]


# -- the cells --------------------------------------------------------------------------------------------------


def digest(pairs: list[Pair]) -> str:
    """Names a candidate set: an arm must select from the pairs its selection cell scored."""
    text = "\n".join(f"{p.instruction}\t{p.response}" for p in pairs)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def pipeline_cell(config: MainConfig) -> dict[str, Any]:
    state = run_to_score(config)
    return {"counts": {name: m.get("counts") for name, m in state.stages.items()}, "config": config.to_dict()}


def filter_table(scores: mutual.PoolScores, ratings: list[int | None], c: MainConfig) -> dict[str, list[float]]:
    """Every filter's score of each pair (higher: kept first); Humpback's unparseable ratings rank last, and its
    many ties (ratings are 1-5) are broken by the seeded random score, so arms and report keep the same pairs
    without favouring pool order."""
    table = {
        f"{method}_{norm}": mutual.filter_scores(scores, method, norm, c.main.lam)
        for method in ("mutual", "forward", "reverse")
        for norm in ("pmi", "none")
    }
    table["random"] = mutual.random_scores(len(ratings), c.seed)
    table["humpback"] = [
        (float(r) if r is not None else 0.0) + 1e-3 * u for r, u in zip(ratings, table["random"], strict=True)
    ]
    return table


def selection_cell(config: MainConfig) -> dict[str, Any]:
    """Claim 1's per-pair values: the truth alignments (ROUGE-L of the written vs the true instruction; the true
    instruction's mean log-likelihood under the K-round reverse model) and every filter's score."""
    state = run_to_score(config)
    pairs, system = state.synthesis.pairs, config.main.system_seed
    truth = true_instructions(config, pairs)
    bank, tokenizer = bank_of(config)
    bank.ensure("reverse", stage_dir(config, config.main.rounds) / "reverse")
    bank.ensure("seed_forward", stage_dir(config, 0) / "forward")
    with bank.use("reverse") as model:
        loglik = true_instruction_loglik(model, tokenizer, [p.response for p in pairs], truth, config.scoring, system)
    with bank.engine_scope(), bank.generator("seed_forward", config.rating) as model:
        ratings = mutual.humpback_ratings(model, tokenizer, pairs, config.rating, system)
    return {
        "n": len(pairs),
        "candidates": digest(pairs),
        "rouge_l": rouge_l([p.instruction for p in pairs], truth),
        "true_loglik": loglik,
        "scores": filter_table(state.scores, ratings, config),
        "unparseable_ratings": sum(r is None for r in ratings),
    }


def heldout_responses(config: MainConfig, n: int) -> list[Pair]:
    """n pool responses the run never saw (cleaned as the pool is, outside its sample), with their true
    instructions: the same for every k."""
    tokenizer = load_tokenizer(config.model)
    raw = data.load_source(config.pool_data, allow_missing_instruction=True)
    cleaned, _ = data.clean_pairs(raw, tokenizer, config.max_length, require_instruction=False)
    _, outside = data.sample_pairs(cleaned, config.n_pool, config.seed)
    if len(outside) < n:
        raise ValueError(f"heldout_responses = {n}, but only {len(outside)} pool responses are outside n_pool")
    chosen = random.Random(f"heldout-responses:{config.seed}").sample(outside, n)
    return [Pair(x, p.response, p.source) for p, x in zip(chosen, true_instructions(config, chosen), strict=True)]


def recovery(config: MainConfig, bank: ModelBank, tokenizer: Any, k: int, pairs: list[Pair]) -> dict[str, Any]:
    """The adapters after k rounds on held-out (true instruction, response) pairs: the reverse model's written
    instructions against the true ones, the true one's likelihood, and the mutual score of true vs shuffled pairs."""
    names = (bank.ensure(f"forward_{k}", stage_dir(config, k) / "forward"), f"reverse_{k}")
    bank.ensure(names[1], stage_dir(config, k) / "reverse")
    system, truth = config.main.system_seed, [p.instruction for p in pairs]
    with bank.engine_scope(), bank.generator(names[1], config.synthesis) as model:
        written = generate.complete_pairs(model, tokenizer, "reverse", pairs, config.synthesis, system)
    with bank.use(names[1]) as model:
        loglik = true_instruction_loglik(model, tokenizer, [p.response for p in pairs], truth, config.scoring, system)
    pooled = pairs + mutual.shuffled_pairs(pairs, config.seed)
    scores = mutual.score_pool(bank, tokenizer, pooled, config.scoring, system, names)
    mutual_scores = mutual.filter_scores(scores, "mutual", config.main.score_normalization, config.main.lam)
    return {
        "rouge_l": rouge_l([data.normalize_text(g.text) for g in written], truth),
        "true_loglik": loglik,
        "true_pair_scores": mutual_scores[: len(pairs)],
        "shuffled_pair_scores": mutual_scores[len(pairs) :],
    }


def rounds_cell(config: MainConfig, sizes: MainSizes) -> dict[str, Any]:
    run_main(config, until=aligned_stage(config, config.main.rounds))
    pairs = heldout_responses(config, sizes.heldout_responses)
    bank, tokenizer = bank_of(config)
    by_k = {str(k): recovery(config, bank, tokenizer, k, pairs) for k in range(config.main.rounds + 1)}
    return {"n": len(pairs), "k": by_k}


def arm_pairs(
    state: PipelineState, arm: str, scores: dict[str, list[float]], fraction: float, c: MainConfig
) -> list[Pair]:
    """The synthetic pairs arm `arm` trains on (besides the seed): none, all, or the top `fraction` by its filter."""
    candidates = state.synthesis.pairs
    if arm == "seed_only":
        return []
    if arm == "unfiltered":
        return list(candidates)
    key = f"mutual_{c.main.score_normalization}" if arm == "mutual" else arm
    return [candidates[i] for i in mutual.select(scores[key], top_fraction=fraction)]


def test_problems(n: int) -> list[Pair]:
    """The first n GSM8K test problems with their solutions written as the pool's are (none is in the pool: it
    holds train solutions)."""
    test = gsm8k("full")["test"]
    if n > len(test):
        raise ValueError(f"test_problems = {n}, but GSM8K's test set has {len(test)}")
    return [Pair(row["question"], gsm8k_solution(row["answer"]), "gsm8k_test") for row in test.select(range(n))]


def arm_cell(config: MainConfig, sizes: MainSizes, arm: str, selection: dict[str, Any] | None) -> dict[str, Any]:
    """Claim 2 for one arm: a fresh forward adapter on seed ∪ the arm's pairs for as many optimiser steps as a
    filtered arm takes (epochs scaled by the data size), then each test solution's NLL per token."""
    if selection is None:
        raise RuntimeError("the arm cells need their seed's selection cell; run the study in order")
    state = run_to_score(config)
    if digest(state.synthesis.pairs) != selection["candidates"]:
        raise RuntimeError(
            f"main_s{config.seed}: the pipeline's candidates are not the ones its selection cell scored (a rerun "
            "wrote other instructions); delete that seed's selection and arm cells and run the study again"
        )
    synthetic = arm_pairs(state, arm, selection["scores"], sizes.arm_fraction, config)
    pairs = sft.weight_pairs(state.seed_pairs, synthetic, config.main.final_alpha)
    reference = len(state.seed_pairs) + mutual.kept_count(len(state.synthesis.pairs), sizes.arm_fraction)
    settings = final_settings(config, epochs=config.final_sft.epochs * reference / len(pairs))
    out = Path(config.runs_dir) / config.run_name / "study_arms" / arm
    bank, tokenizer = bank_of(config)
    bank.add("final", config.lora, seed=settings.seed)
    saved = {"lora": dataclasses.asdict(config.lora), "arm": arm}
    result = sft.train_bank_adapter(bank, "final", tokenizer, pairs, settings, out, saved)
    problems = test_problems(sizes.test_problems)
    with bank.use("final") as model:
        nll = [-s.mean for s in score_pairs(model, tokenizer, "forward", problems, config.scoring)]
    record = {"arm": arm, "synthetic": len(synthetic), "seed": len(state.seed_pairs), "epochs": settings.epochs}
    record |= {"steps": result.counts.get("optimizer_steps"), "losses": result.loss_values, "nll": nll}
    if config.seed in sizes.fewshot_seeds:
        record["gsm8k"] = gsm8k_accuracy(config, out, sizes)
    return record


def gsm8k_accuracy(config: MainConfig, adapter: Path, sizes: MainSizes) -> dict[str, Any]:
    """lm-eval's GSM8K (5-shot, chat template) on the first `fewshot_problems` test problems: each problem's
    exact match under both of its filters."""
    root = Path(config.runs_dir)
    samples = adapter / "gsm8k_samples"
    rows = evaluate.evaluate(
        config.model, str(adapter), ["gsm8k"], data="full", limit=sizes.fewshot_problems, apply_chat_template=True,
        max_gen_toks=sizes.max_gen_toks, cache_dir=str(root / "lm_eval_cache"), samples_dir=str(samples),
        results_dir=str(root / "eval"), run_name=adapter.name,
    )  # fmt: skip
    per_doc = data.load_jsonl(next(samples.glob("*__gsm8k.jsonl")))
    return {
        "summary": [{k: r.get(k) for k in ("metric", "value", "stderr", "n")} for r in rows],
        "exact_match": {
            f: [s["exact_match"] for s in per_doc if s.get("filter") == f] for f in ("strict-match", "flexible-extract")
        },
    }
