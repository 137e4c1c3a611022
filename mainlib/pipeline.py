"""The MAIN pipeline as resumable stages (ALGORITHMS.md §1, §3):

    init_sft -> round_0 .. round_{K-1} -> synthesize -> score -> select -> final_sft

Each stage lives in `runs/<run_name>/<stage>/` (see `stages.Run`); adapters are saved there and reloaded
when a later stage needs them, so a notebook can stop after `synthesize` and the next one resumes.
The final SFT trains a fresh adapter on the base model with seed ∪ selected (weight `final_alpha`), so
every filter method starts from the same point.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mainlib import data
from mainlib.config import MainConfig, validate
from mainlib.data import Pair
from mainlib.models import load_adapter, load_tokenizer, save_adapter
from mainlib.mutual import (
    PoolScores,
    Synthesis,
    alpha_schedule,
    filter_scores,
    humpback_ratings,
    round_update,
    score_pool,
    select,
    synthesize,
)
from mainlib.results import write_json, write_jsonl
from mainlib.sft import SFTSettings, train_adapter, weight_pairs
from mainlib.stages import Run, fingerprint

STAGES = ("init_sft", "rounds", "synthesize", "score", "select", "final_sft")


PipelineConfig = MainConfig  # defined once, in mainlib.config (flat names, recipes, validation)


@dataclass
class PipelineState:
    """What the stages produced so far (loaded from disk for skipped stages)."""

    seed_pairs: list[Pair]
    pool: list[Pair]
    clean: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> manifest
    ran: list[str] = field(default_factory=list)  # stages computed in this call (the others were up to date)
    sft: dict[str, Any] = field(default_factory=dict)  # "init_forward", "round_0_forward", ..., "final"
    synthesis: Synthesis | None = None
    scores: PoolScores | None = None
    ratings: list[int | None] | None = None
    selection: dict[str, Any] | None = None

    def record(self, stage) -> None:
        self.stages[stage.name] = stage.manifest
        if not stage.skipped:
            self.ran.append(stage.name)


def load_inputs(config: PipelineConfig, tokenizer) -> tuple[list[Pair], list[Pair], dict[str, Any]]:
    """Seed pairs and pool responses, cleaned and sampled; fails clearly when nothing usable is left."""
    seed_all, seed_report = data.clean_pairs(data.load_source(config.seed_data), tokenizer, config.max_length)
    seed_pairs, _ = data.sample_pairs(seed_all, config.n_seed, config.seed)
    if not seed_pairs:
        raise ValueError(f"{config.seed_data}: no seed pair survives cleaning {seed_report.dropped}")
    pool_raw = data.load_source(config.pool_data, allow_missing_instruction=True)
    if not pool_raw:
        raise ValueError(f"{config.pool_data}: the unlabeled pool is empty; point pool_data at a file of responses")
    pool_all, pool_report = data.clean_pairs(pool_raw, tokenizer, config.max_length, require_instruction=False)
    if not pool_all:
        raise ValueError(
            f"{config.pool_data}: no response survives cleaning {pool_report.dropped}; "
            f"raise max_length (now {config.max_length}) or check the file"
        )
    pool, _ = data.sample_pairs(pool_all, config.n_pool, config.seed)
    return seed_pairs, pool, {"seed": seed_report.to_dict(), "pool": pool_report.to_dict()}


def run_main(config: PipelineConfig, until: str = "final_sft", force: bool = False) -> PipelineState:
    """Run (or resume) the MAIN stages up to and including `until` ("init_sft", "rounds", ..., "final_sft")."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {', '.join(STAGES)}; got {until!r}")
    validate(config)  # everything checkable without a model, before the first stage
    last = STAGES.index(until)
    tokenizer = load_tokenizer(config.model)
    seed_pairs, pool, clean = load_inputs(config, tokenizer)
    state = PipelineState(seed_pairs, pool, clean)
    run = Run(Path(config.runs_dir) / config.run_name, config.identity(), force=force)
    seed_fp = fingerprint([p.to_dict() for p in seed_pairs])
    models: dict[str, Any] = {}  # "forward"/"reverse" -> peft model currently in memory, with its stage dir

    def adapter(direction: str, stage_dir: Path, trainable: bool = False):
        """The model of `direction` as saved in `stage_dir` (kept in memory when it is already that one)."""
        held = models.get(direction)
        if held is None or held[1] != stage_dir:
            model, _, _ = load_adapter(stage_dir / direction, config.quantization, is_trainable=trainable)
            models[direction] = (model, stage_dir)
        return models[direction][0]

    # -- init_sft: forward and reverse adapters on the seed set (Step 0)
    def init_sft(out: Path) -> dict[str, Any]:
        counts = {}
        for direction in ("forward", "reverse"):
            settings = SFTSettings(
                **{
                    **config.sft.to_dict(),
                    "direction": direction,
                    "seed": config.seed,
                    "max_length": config.max_length,
                    "system_seed": config.main.system_seed,
                }
            )
            model, result = train_adapter(
                config.model, tokenizer, seed_pairs, settings, config.lora, out / direction, config.quantization
            )
            models[direction] = (model, out)
            counts[direction] = result.counts
        return counts

    init_config = {
        "sft": config.sft.to_dict(),
        "lora": asdict(config.lora),
        "quantization": config.quantization,
        "max_length": config.max_length,
        "seed": config.seed,
        "system_seed": config.main.system_seed,
    }
    stage = run.stage("init_sft", init_config, {"seed": seed_fp}, init_sft)
    state.record(stage)
    for direction in ("forward", "reverse"):
        state.sft[f"init_{direction}"] = json.loads((stage.dir / direction / "sft_result.json").read_text())
    if last == 0:
        return state

    # -- rounds: K mutual-alignment rounds (Step 1)
    previous = stage
    alphas = alpha_schedule(
        config.main.alpha_schedule, config.main.alpha_start, config.main.alpha_end, config.main.rounds
    )
    for k, alpha in enumerate(alphas):

        def one_round(out: Path, k: int = k, alpha: float = alpha, source: Path = previous.dir) -> dict[str, Any]:
            forward, reverse = adapter("forward", source, True), adapter("reverse", source, True)
            result = round_update(
                k,
                alpha,
                forward,
                reverse,
                tokenizer,
                seed_pairs,
                SFTSettings(
                    **{**config.round_sft.to_dict(), "max_length": config.max_length, "seed": config.seed + k + 1}
                ),
                config.round_generation,
                out,
                config.main,
            )
            for direction, model in (("forward", forward), ("reverse", reverse)):
                save_adapter(
                    model,
                    tokenizer,
                    out / direction,
                    {"base_model": config.model, "quantization": config.quantization, "round": k},
                )
                models[direction] = (model, out)
            write_json(out / "round.json", result.to_dict())
            return {
                "alpha": alpha,
                "synthetic_instructions": result.synthetic_instructions,
                "synthetic_responses": result.synthetic_responses,
            }

        round_config = {
            "k": k,
            "alpha": alpha,
            "round_sft": config.round_sft.to_dict(),
            "generation": asdict(config.round_generation),
            "system_synthetic": config.main.system_synthetic,
        }
        previous = run.stage(f"round_{k}", round_config, {"previous": previous.fingerprint}, one_round)
        state.record(previous)
        round_record = json.loads((previous.dir / "round.json").read_text())
        state.sft[f"round_{k}_forward"] = round_record["forward"]
        state.sft[f"round_{k}_reverse"] = round_record["reverse"]
    aligned = previous  # the stage holding p_f^K and p_r^K
    if last == 1:
        return state

    # -- synthesize: p_r^K writes an instruction for every pool response (Step 2)
    def do_synthesis(out: Path) -> dict[str, Any]:
        result = synthesize(adapter("reverse", aligned.dir), tokenizer, pool, config.synthesis)
        write_jsonl(out / "synthetic.jsonl", [p.to_dict() for p in result.pairs])
        write_jsonl(out / "rows.jsonl", result.rows)
        if not result.pairs:
            raise ValueError(f"synthesis kept no pair ({result.dropped}); raise synthesis.max_new_tokens")
        return {"pool": len(pool), "kept": len(result.pairs), "dropped": result.dropped}

    pool_fp = fingerprint([p.to_dict() for p in pool])
    stage = run.stage(
        "synthesize",
        {"generation": asdict(config.synthesis)},
        {"pool": pool_fp, "aligned": aligned.fingerprint},
        do_synthesis,
    )
    state.record(stage)
    synthetic = [Pair(**r) for r in data.load_jsonl(stage.dir / "synthetic.jsonl")]
    state.synthesis = Synthesis(
        synthetic, data.load_jsonl(stage.dir / "rows.jsonl"), stage.manifest["counts"]["dropped"]
    )
    synthesized = stage
    if last == 2:
        return state

    # -- score: both models' likelihoods of every synthetic pair (Step 3); ratings for the humpback baseline
    def do_score(out: Path) -> dict[str, Any]:
        forward, reverse = adapter("forward", aligned.dir), adapter("reverse", aligned.dir)
        scores = score_pool(forward, reverse, tokenizer, synthetic, config.scoring)
        write_json(out / "scores.json", scores.to_dict())
        counts: dict[str, Any] = {"scored": len(synthetic)}
        if config.main.filter_method == "humpback":
            seed_forward = adapter("forward", run.dir / "init_sft")  # Humpback rates with the seed model
            ratings = humpback_ratings(seed_forward, tokenizer, synthetic, config.rating)
            write_json(out / "ratings.json", ratings)
            counts["unparseable_ratings"] = sum(r is None for r in ratings)
        return counts

    stage = run.stage(
        "score",
        {
            "scoring": asdict(config.scoring),
            "humpback": config.main.filter_method == "humpback",
            "rating": asdict(config.rating),
        },
        {"synthetic": synthesized.fingerprint, "aligned": aligned.fingerprint},
        do_score,
    )
    state.record(stage)
    state.scores = PoolScores(**json.loads((stage.dir / "scores.json").read_text()))
    if (stage.dir / "ratings.json").is_file():
        state.ratings = json.loads((stage.dir / "ratings.json").read_text())
    scored = stage
    if last == 3:
        return state

    # -- select: the filter and the selection rule
    def do_select(out: Path) -> dict[str, Any]:
        main = config.main
        if main.filter_method == "none":
            values, kept = [0.0] * len(synthetic), list(range(len(synthetic)))
        elif main.filter_method == "humpback":
            if state.ratings is None:
                raise ValueError("filter_method='humpback' needs ratings: the score stage did not write them")
            values = [float(r) if r is not None else 0.0 for r in state.ratings]
            kept = [i for i, r in enumerate(state.ratings) if r is not None and r >= main.humpback_min_rating]
        else:
            values = filter_scores(state.scores, main.filter_method, main.score_normalization, main.lam)
            kept = select(values, main.top_fraction, main.threshold)  # validate: exactly one is set
        write_json(out / "selection.json", {"scores": values, "kept": kept})
        write_jsonl(out / "selected.jsonl", [synthetic[i].to_dict() for i in kept])
        return {"candidates": len(synthetic), "selected": len(kept)}

    select_config = {
        k: getattr(config.main, k)
        for k in ("filter_method", "score_normalization", "lam", "top_fraction", "threshold", "humpback_min_rating")
    }
    stage = run.stage("select", select_config, {"scores": scored.fingerprint}, do_select)
    state.record(stage)
    state.selection = json.loads((stage.dir / "selection.json").read_text())
    selected = [Pair(**r) for r in data.load_jsonl(stage.dir / "selected.jsonl")]
    chosen = stage
    if last == 4:
        return state

    # -- final_sft: a fresh forward adapter on seed ∪ selected, α-weighted (Step 4)
    def do_final(out: Path) -> dict[str, Any]:
        models.clear()  # the aligned models are done: free their memory before loading the base again
        gc.collect()
        settings = SFTSettings(
            **{
                **config.final_sft.to_dict(),
                "direction": "forward",
                "seed": config.seed,
                "max_length": config.max_length,
                "system_seed": config.main.system_seed,
                "system_synthetic": config.main.system_synthetic,
            }
        )
        model, result = train_adapter(
            config.model,
            tokenizer,
            weight_pairs(seed_pairs, selected, config.main.final_alpha),
            settings,
            config.lora,
            out / "forward",
            config.quantization,
        )
        models["final"] = (model, out)
        return result.counts

    stage = run.stage(
        "final_sft",
        {"sft": config.final_sft.to_dict(), "final_alpha": config.main.final_alpha, "lora": asdict(config.lora)},
        {"seed": seed_fp, "selected": chosen.fingerprint},
        do_final,
    )
    state.record(stage)
    state.sft["final"] = json.loads((stage.dir / "forward" / "sft_result.json").read_text())
    return state
