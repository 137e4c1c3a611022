"""The MAIN pipeline (ALGORITHMS.md §1, §3), declared as stages over one base model with named adapters:

    inputs -> init_sft -> round_0 .. round_{K-1} -> synthesize -> score [-> rate] -> select -> final_sft

Each stage is a top-level function `f(ctx) -> counts` below; `main_stages(config)` lists them with the config
fields each reads and the stages each consumes, and `stages.Run.execute` skips, resumes or reruns them (a
changed field reruns exactly the stages that read it, and what follows them). All adapters (forward, reverse,
the seed-only ones Humpback uses, the final one) are named adapters of one loaded base (`adapters.ModelBank`):
a stage saves what it trains in its own folder, and a later stage loads it by name unless it is still in
memory. Synthesis, scoring and rating stream their input in shards (`shards.run_sharded`), so a killed stage
resumes at its first missing shard and memory does not grow with the pool.

To add a stage: write `f(ctx)` and declare it in `main_stages`. A filter method: `mutual.filter_scores`
(and the `FilterMethod` choices). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mainlib import data, distributed, generate, mutual, prompts, scoring, sft, shards
from mainlib.adapters import ModelBank, Shared
from mainlib.config import MainConfig, validate
from mainlib.data import Pair
from mainlib.models import load_tokenizer, use_checkpointing
from mainlib.results import write_json, write_jsonl
from mainlib.stages import Run, Stage, StageContext, StageResult

PipelineConfig = MainConfig  # defined once, in mainlib.config (flat names, recipes, validation)


# -- reading what earlier stages wrote ------------------------------------------------------------------------


def read_pairs(path: Path) -> Iterator[Pair]:
    """The pairs of a JSONL file, streamed."""
    for _, record in data.jsonl_records(path):
        yield Pair(**record)


def seed_pairs(ctx: StageContext) -> list[Pair]:
    return list(read_pairs(ctx.inputs["inputs"].dir / "seed.jsonl"))


def sft_settings(hyper: sft.SFTHyperparameters, c: MainConfig, **run_wide: Any) -> sft.SFTSettings:
    """One SFT's settings: its own hyperparameters plus the run-wide length, seed and seed-data tag."""
    return sft.SFTSettings(
        **hyper.to_dict(), max_length=c.max_length, seed=c.seed, system_seed=c.main.system_seed, **run_wide
    )


def final_settings(c: MainConfig, epochs: float | None = None) -> sft.SFTSettings:
    """The final SFT's settings (`epochs`: another number of passes, e.g. to give every study arm the same steps)."""
    hyper = c.final_sft if epochs is None else dataclasses.replace(c.final_sft, epochs=epochs)
    return sft_settings(hyper, c, direction="forward", system_synthetic=c.main.system_synthetic)


def train_adapter(ctx: StageContext, name: str, pairs: list, settings: sft.SFTSettings, saved_as: str) -> dict:
    """A fresh adapter `name` on the shared base, trained on `pairs` and saved as this stage's `saved_as`."""
    bank = ctx.shared.bank
    if name in bank.names:
        bank.drop(name)
    bank.add(name, ctx.config.lora, seed=settings.seed)
    saved = {"lora": dataclasses.asdict(ctx.config.lora)}
    result = sft.train_bank_adapter(bank, name, ctx.shared.tokenizer, pairs, settings, ctx.dir / saved_as, saved)
    return result.counts


# -- the stages ------------------------------------------------------------------------------------------------


def load_inputs(ctx: StageContext) -> dict[str, Any]:
    """Seed pairs and pool responses, cleaned and sampled; fails clearly when nothing usable is left."""
    c, tokenizer = ctx.config, ctx.shared.tokenizer
    seed_all, seed_report = data.clean_pairs(data.load_source(c.seed_data), tokenizer, c.max_length)
    seed, _ = data.sample_pairs(seed_all, c.n_seed, c.seed)
    if not seed:
        raise ValueError(f"{c.seed_data}: no seed pair survives cleaning {seed_report.dropped}")
    pool_raw = data.load_source(c.pool_data, allow_missing_instruction=True)
    if not pool_raw:
        raise ValueError(f"{c.pool_data}: the unlabeled pool is empty; point pool_data at a file of responses")
    pool_all, pool_report = data.clean_pairs(pool_raw, tokenizer, c.max_length, require_instruction=False)
    if not pool_all:
        raise ValueError(
            f"{c.pool_data}: no response survives cleaning {pool_report.dropped}; "
            f"raise max_length (now {c.max_length}) or check the file"
        )
    pool, _ = data.sample_pairs(pool_all, c.n_pool, c.seed)
    write_jsonl(ctx.dir / "seed.jsonl", [p.to_dict() for p in seed])
    write_jsonl(ctx.dir / "pool.jsonl", [p.to_dict() for p in pool])
    write_json(ctx.dir / "clean.json", {"seed": seed_report.to_dict(), "pool": pool_report.to_dict()})
    return {"seed": len(seed), "pool": len(pool)}


def init_sft(ctx: StageContext) -> dict[str, Any]:
    """Step 0: forward and reverse adapters trained on the seed set."""
    seed = seed_pairs(ctx)
    return {
        direction: train_adapter(
            ctx, direction, seed, sft_settings(ctx.config.sft, ctx.config, direction=direction), direction
        )
        for direction in ("forward", "reverse")
    }


def mutual_round(ctx: StageContext) -> dict[str, Any]:
    """Step 1, round k: both adapters of the previous stage, updated in turn (`mutual.round_update`)."""
    c, k, bank, tokenizer = ctx.config, ctx.params["k"], ctx.shared.bank, ctx.shared.tokenizer
    for direction in ("forward", "reverse"):
        bank.ensure(direction, ctx.inputs[ctx.params["previous"]].dir / direction, trainable=True)
    alpha = mutual.alpha_schedule(c.main.alpha_schedule, c.main.alpha_start, c.main.alpha_end, c.main.rounds)[k]
    settings = dataclasses.replace(sft_settings(c.round_sft, c), seed=c.seed + k + 1)
    result = mutual.round_update(
        k, alpha, bank, tokenizer, seed_pairs(ctx), settings, c.round_generation, ctx.dir, c.main
    )
    for direction in ("forward", "reverse"):
        bank.save(direction, ctx.dir / direction, tokenizer, {"round": k, "lora": dataclasses.asdict(c.lora)})
    distributed.on_main(lambda: write_json(ctx.dir / "round.json", result.to_dict()))
    return {
        "alpha": alpha,
        "synthetic_instructions": result.synthetic_instructions,
        "synthetic_responses": result.synthetic_responses,
    }


def synthesize(ctx: StageContext) -> dict[str, Any]:
    """Step 2: the reverse adapter writes an instruction for every pool response, shard by shard (each process its
    own shards); then the main process keeps the pairs (`keep_synthetic`)."""
    c, tokenizer, bank = ctx.config, ctx.shared.tokenizer, ctx.shared.bank
    name = bank.ensure(ctx.params["adapter"], ctx.inputs[ctx.params["reverse_from"]].dir / "reverse")

    def work(pool: list[Pair], index: int) -> list[dict[str, Any]]:
        settings = dataclasses.replace(c.synthesis, seed=shards.shard_seed(c.synthesis.seed, index))
        with bank.generator(name, settings) as model:
            written = generate.complete_pairs(model, tokenizer, "reverse", pool, settings, c.main.system_seed)
        return [mutual.synthesis_row(p, g) for p, g in zip(pool, written, strict=True)]

    pool = read_pairs(ctx.inputs["inputs"].dir / "pool.jsonl")
    with bank.engine_scope():
        summary = shards.run_sharded(ctx.dir, pool, c.shard_size, work, fingerprint=ctx.fingerprint, desc="synthesize")
    return distributed.on_main(lambda: keep_synthetic(ctx.dir, summary.rows_out))


def keep_synthetic(folder: Path, n_rows: int) -> dict[str, Any]:
    """After synthesis: mark duplicates over the whole pool (one streamed pass) and write the kept pairs."""
    write_jsonl(folder / "rows.jsonl", mutual.mark_duplicates(shards.iter_rows(folder)))
    kept = (
        mutual.synthesis_pair(r).to_dict() for _, r in data.jsonl_records(folder / "rows.jsonl") if not r["dropped"]
    )
    write_jsonl(folder / "synthetic.jsonl", kept)
    found = Counter(row["dropped"] for _, row in data.jsonl_records(folder / "rows.jsonl") if row["dropped"])
    dropped = {reason: found.get(reason, 0) for reason in mutual.SYNTHESIS_DROP_REASONS}
    n_kept = n_rows - sum(dropped.values())
    if not n_kept:
        raise ValueError(f"synthesis kept no pair ({dropped}); raise synthesis.max_new_tokens")
    return {"pool": n_rows, "kept": n_kept, "dropped": dropped}


def score(ctx: StageContext) -> dict[str, Any]:
    """Step 3: both aligned adapters' likelihoods of every synthetic pair, conditional and unconditional."""
    c, tokenizer, bank = ctx.config, ctx.shared.tokenizer, ctx.shared.bank
    aligned = ctx.inputs[ctx.params["aligned"]].dir  # p_f^K and p_r^K: a round leaves them in memory
    names = (bank.ensure("forward", aligned / "forward"), bank.ensure("reverse", aligned / "reverse"))

    def work(pairs: list[Pair], index: int) -> list[dict[str, float]]:
        return mutual.score_pool(bank, tokenizer, pairs, c.scoring, c.main.system_seed, names).rows()

    synthetic = read_pairs(ctx.inputs["synthesize"].dir / "synthetic.jsonl")
    summary = shards.run_sharded(ctx.dir, synthetic, c.shard_size, work, fingerprint=ctx.fingerprint, desc="score")
    return {"scored": summary.rows_out}


def rate(ctx: StageContext) -> dict[str, Any]:
    """Humpback's self-curation: the seed-only forward adapter rates every synthetic pair 1-5."""
    c, tokenizer, bank = ctx.config, ctx.shared.tokenizer, ctx.shared.bank
    name = bank.ensure("seed_forward", ctx.inputs["init_sft"].dir / "forward")

    def work(pairs: list[Pair], index: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
        with bank.generator(name, c.rating) as model:
            ratings = mutual.humpback_ratings(model, tokenizer, pairs, c.rating, c.main.system_seed)
        return [{"rating": r} for r in ratings], {"unparseable_ratings": sum(r is None for r in ratings)}

    synthetic = read_pairs(ctx.inputs["synthesize"].dir / "synthetic.jsonl")
    with bank.engine_scope():
        summary = shards.run_sharded(ctx.dir, synthetic, c.shard_size, work, fingerprint=ctx.fingerprint, desc="rate")
    return {"rated": summary.rows_out, "unparseable_ratings": summary.counts.get("unparseable_ratings", 0)}


def filter_values(ctx: StageContext) -> tuple[list[float], list[int]]:
    """Every pair's filter score and the kept indices, best first (ALGORITHMS.md §1 Step 3, §3)."""
    main = ctx.config.main
    if main.filter_method == "humpback":
        ratings = [r["rating"] for r in shards.iter_rows(ctx.inputs["rate"].dir)]
        kept = [i for i, r in enumerate(ratings) if r is not None and r >= main.humpback_min_rating]
        return [float(r) if r is not None else 0.0 for r in ratings], kept
    scores = mutual.PoolScores.from_rows(shards.iter_rows(ctx.inputs["score"].dir))
    if main.filter_method == "none":
        return [0.0] * len(scores.forward), list(range(len(scores.forward)))
    values = mutual.filter_scores(scores, main.filter_method, main.score_normalization, main.lam, ctx.config.seed)
    return values, mutual.select(values, main.top_fraction, main.threshold)


def select(ctx: StageContext) -> dict[str, Any]:
    """The filter's score for every pair and the pairs it keeps."""
    values, kept = filter_values(ctx)
    write_json(ctx.dir / "selection.json", {"scores": values, "kept": kept})
    chosen = set(kept)
    synthetic = read_pairs(ctx.inputs["synthesize"].dir / "synthetic.jsonl")
    write_jsonl(ctx.dir / "selected.jsonl", (p.to_dict() for i, p in enumerate(synthetic) if i in chosen))
    return {"candidates": len(values), "selected": len(kept)}


def final_sft(ctx: StageContext) -> dict[str, Any]:
    """Step 4: a fresh forward adapter on seed ∪ selected, α-weighted, so every filter starts from one point."""
    c = ctx.config
    selected = list(read_pairs(ctx.inputs["select"].dir / "selected.jsonl"))
    pairs = sft.weight_pairs(seed_pairs(ctx), selected, c.main.final_alpha)
    settings = final_settings(c)
    return train_adapter(ctx, "final", pairs, settings, "forward")


# -- the declaration -------------------------------------------------------------------------------------------

MODEL = ("model", "quantization")  # every stage that runs the model reads these
TRAINS = (*MODEL, "lora", "max_length", "seed", "main.system_seed")  # and every stage that trains, these
SHARDED = (*MODEL, "shard_size", "main.system_seed")  # shards are seeded per index; prompts carry the seed tag
SELECT = (
    "seed",  # the random filter's draws
    *(
        f"main.{name}"
        for name in ("filter_method", "score_normalization", "lam", "top_fraction", "threshold", "humpback_min_rating")
    ),
)
INPUTS = ("seed_data", "pool_data", "n_seed", "n_pool", "max_length", "seed")
ALPHAS = ("main.rounds", "main.alpha_schedule", "main.alpha_start", "main.alpha_end")


def round_stage(k: int) -> Stage:
    """Round k of the mutual alignment: it updates the adapters of round k-1 (of init_sft for k = 0)."""
    previous = f"round_{k - 1}" if k else "init_sft"
    return Stage(
        f"round_{k}",
        mutual_round,
        reads=(*TRAINS, "round_sft", "round_generation", *ALPHAS, "main.system_synthetic"),
        needs=("inputs", previous),
        params={"k": k, "previous": previous},
        code=(mutual, sft, generate, prompts),
        every_process=True,
    )


def aligned_stage(config: MainConfig, k: int) -> str:
    """The stage holding p_f^k and p_r^k, the adapters after k rounds (k = 0: the seed-only ones of init_sft)."""
    if not 0 <= k <= config.main.rounds:
        raise ValueError(f"k must be in [0, rounds = {config.main.rounds}]; got {k}")
    return f"round_{k - 1}" if k else "init_sft"


def main_stages(config: MainConfig) -> list[Stage]:
    """MAIN's stages in order, with what each reads and needs (K rounds; `rate` only for Humpback)."""
    aligned = aligned_stage(config, config.main.rounds)
    humpback = config.main.filter_method == "humpback"
    reverse_from = "init_sft" if humpback else aligned  # Humpback backtranslates with the seed-only model (§3)
    rating = [
        Stage(
            "rate",
            rate,
            reads=(*SHARDED, "rating"),
            needs=("synthesize", "init_sft"),
            code=(mutual, generate, prompts),
            resumable=True,
            every_process=True,
        )
    ]
    return [
        Stage("inputs", load_inputs, reads=(*INPUTS, "model"), files=("seed_data", "pool_data"), code=(data,)),
        Stage("init_sft", init_sft, reads=(*TRAINS, "sft"), needs=("inputs",), code=(sft, prompts), every_process=True),
        *[round_stage(k) for k in range(config.main.rounds)],
        Stage(
            "synthesize",
            synthesize,
            reads=(*SHARDED, "synthesis"),
            needs=("inputs", reverse_from),
            params={"reverse_from": reverse_from, "adapter": "seed_reverse" if humpback else "reverse"},
            code=(mutual, generate, prompts),
            resumable=True,
            every_process=True,
        ),
        Stage(
            "score",
            score,
            reads=(*SHARDED, "scoring"),
            needs=("synthesize", aligned),
            params={"aligned": aligned},
            code=(mutual, scoring, prompts),
            resumable=True,
            every_process=True,
        ),
        *(rating if humpback else []),
        Stage("select", select, reads=SELECT, needs=("synthesize", "rate" if humpback else "score"), code=(mutual,)),
        Stage(
            "final_sft",
            final_sft,
            reads=(*TRAINS, "final_sft", "main.final_alpha", "main.system_synthetic"),
            needs=("inputs", "select"),
            code=(sft, prompts),
            every_process=True,
        ),
    ]


# -- running it ------------------------------------------------------------------------------------------------


@dataclass
class PipelineState:
    """What the stages produced so far, read back from their folders (computed now or earlier)."""

    seed_pairs: list[Pair]
    pool: list[Pair]
    clean: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> manifest
    ran: list[str] = field(default_factory=list)  # stages computed in this call (the others were up to date)
    sft: dict[str, Any] = field(default_factory=dict)  # "init_forward", "round_0_forward", ..., "final"
    synthesis: mutual.Synthesis | None = None
    scores: mutual.PoolScores | None = None
    ratings: list[int | None] | None = None
    selection: dict[str, Any] | None = None


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def load_state(results: dict[str, StageResult]) -> PipelineState:
    """The notebooks' view of a run: every finished stage's outputs, loaded."""
    folder = {name: result.dir for name, result in results.items()}
    inputs = folder["inputs"]
    state = PipelineState(
        list(read_pairs(inputs / "seed.jsonl")), list(read_pairs(inputs / "pool.jsonl")), _json(inputs / "clean.json")
    )
    state.stages = {name: result.manifest for name, result in results.items()}
    state.ran = [name for name, result in results.items() if not result.skipped]
    for name, where in folder.items():
        if name == "init_sft":
            state.sft |= {f"init_{d}": _json(where / d / "sft_result.json") for d in ("forward", "reverse")}
        elif name.startswith("round_"):
            state.sft |= {f"{name}_{d}": _json(where / "round.json")[d] for d in ("forward", "reverse")}
        elif name == "synthesize":
            rows = data.load_jsonl(where / "rows.jsonl")
            pairs = [mutual.synthesis_pair(r) for r in rows if not r["dropped"]]
            state.synthesis = mutual.Synthesis(pairs, rows, results[name].manifest["counts"]["dropped"])
        elif name == "score":
            state.scores = mutual.PoolScores.from_rows(shards.iter_rows(where))
        elif name == "rate":
            state.ratings = [row["rating"] for row in shards.iter_rows(where)]
        elif name == "select":
            state.selection = _json(where / "selection.json")
        elif name == "final_sft":
            state.sft["final"] = _json(where / "forward" / "sft_result.json")
    return state


def run_main(config: MainConfig, until: str = "final_sft", force: bool = False) -> PipelineState:
    """Validate the whole config (before any model loads), then run or resume the stages up to `until`."""
    validate(config)
    stages = main_stages(config)
    names = [s.name for s in stages]
    if until not in names:
        raise ValueError(f"until must be one of {', '.join(names)}; got {until!r}")
    run = Run(Path(config.runs_dir) / config.run_name, config.identity(), force=force)
    checkpointing = any(
        use_checkpointing(s.gradient_checkpointing) for s in (config.sft, config.round_sft, config.final_sft)
    )
    bank = ModelBank(config.model, config.quantization, checkpointing, vllm=config.vllm)  # loads on first use
    shared = Shared(load_tokenizer(config.model), bank)
    return load_state(run.execute(stages, config, until, shared))
