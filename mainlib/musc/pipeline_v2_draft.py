"""MuSC (ALGORITHMS.md §2), declared as stages over one base model (with the starting adapter, if any):

    instructions -> decompose -> contrast -> respond -> token_weights -> tdpo

The generation steps and the token weights stream their rows in shards (`shards.run_sharded`), so a killed
stage resumes at its first missing shard. `respond` writes the preference rows {prompt, chosen, rejected,
noised_prompt, constraints, corruption}; `token_weights` adds each response's per-token weights (frozen
starting policy); `tdpo` trains a LoRA adapter with token-weighted DPO and saves it in `tdpo/model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mainlib import data, prompts, shards
from mainlib.adapters import ModelBank
from mainlib.config import MuscConfig
from mainlib.models import load_tokenizer
from mainlib.musc import coarse, tokens
from mainlib.musc import prompts as musc_prompts
from mainlib.pipeline import Shared
from mainlib.results import write_jsonl
from mainlib.stages import Run, Stage, StageContext, StageResult

SELF_INSTRUCT = "self"
POLICY = "policy"  # the bank's name of the starting adapter, when there is one


def policy(ctx: StageContext) -> str | None:
    """The starting policy's adapter name in the bank (loaded once), or None for the plain base."""
    start = ctx.config.adapter
    if start is None:
        return None
    if ctx.shared.sources.get(POLICY) != Path(start):
        ctx.shared.bank.load(POLICY, start)
        ctx.shared.sources[POLICY] = Path(start)
    return POLICY


def load_instructions(spec: str) -> list[dict[str, Any]]:
    """Complex instructions from `bundled:complex_instructions` or a JSONL file of records with `instruction`
    (and optionally `id`, `input`, `task`, `constraints` for `decompose="given"`)."""
    if spec.startswith("bundled:"):
        path = data.bundled_path(data.BUNDLED_FILES[spec.removeprefix("bundled:")])
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"instructions file {path} does not exist")
    records = []
    for line_no, record in data.jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise data.DataError(f"{path}:{line_no}: field 'instruction' (a string) is missing")
        if not record["instruction"].strip():
            raise data.DataError(f"{path}:{line_no}: field 'instruction' is empty")
        records.append({**record, "id": str(record.get("id", f"line_{line_no}"))})
    if not records:
        raise data.DataError(f"{path}: no instruction records")
    return records


def instructions(ctx: StageContext) -> dict[str, Any]:
    """The complex instructions: sampled from a pool, or written by the policy ("self")."""
    c = ctx.config
    if c.instructions == SELF_INSTRUCT:
        with ctx.shared.bank.use(policy(ctx)) as model:
            complete = coarse.writer(model, ctx.shared.tokenizer)
            records, counts = coarse.self_instruct(
                c.n or 24, ctx.shared.tokenizer, complete, c.coarse, c.self_instruct_constraints
            )
    else:
        records = load_instructions(c.instructions)
        picked, _ = data.sample_pairs(records, c.n, c.seed)  # any list samples the same way
        counts = {"available": len(records), "kept": len(picked)}
        records = picked
    write_jsonl(ctx.dir / "rows.jsonl", records)
    return counts


def sharded_step(step: Callable, settings_field: str) -> Callable[[StageContext], dict[str, Any]]:
    """A coarse step (decompose / contrast / respond) over the previous stage's rows, shard by shard.

    Each shard samples with its own seed (`shards.shard_seed`), so a resumed stage writes what an uninterrupted
    one would have written."""

    def compute(ctx: StageContext) -> dict[str, Any]:
        c, previous = ctx.config, ctx.inputs[ctx.stage.needs[0]]

        def work(rows: list[dict[str, Any]], index: int):
            generation = getattr(c.coarse, settings_field)
            seeded = dataclasses.replace(generation, seed=shards.shard_seed(generation.seed, index))
            settings = dataclasses.replace(c.coarse, **{settings_field: seeded})
            with ctx.shared.bank.use(policy(ctx)) as model:
                return step(rows, ctx.shared.tokenizer, coarse.writer(model, ctx.shared.tokenizer), settings)

        summary = shards.run_sharded(
            ctx.dir, shards.iter_stage_rows(previous.dir), c.shard_size, work,
            fingerprint=ctx.fingerprint, desc=ctx.stage.name,
        )
        return summary.counts

    return compute


def weigh(ctx: StageContext) -> dict[str, Any]:
    """Each response token's weight: how much the frozen starting policy's prediction depends on the constraints."""
    c = ctx.config

    def work(rows: list[dict[str, Any]], index: int):
        x = [r["prompt"] for r in rows] * 2
        x_prime = [r["noised_prompt"] for r in rows] * 2
        y = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        with ctx.shared.bank.use(policy(ctx)) as model:
            weights = tokens.token_weights(model, ctx.shared.tokenizer, x, x_prime, y, c.weights)
        return tokens.attach_weights(rows, weights, c.weights.zero_weights)

    summary = shards.run_sharded(
        ctx.dir, shards.iter_stage_rows(ctx.inputs["respond"].dir), c.shard_size, work,
        fingerprint=ctx.fingerprint, desc="token weights",
    )
    return summary.counts


MODEL = ("model", "adapter", "quantization")
SHARDED = (*MODEL, "shard_size")


def musc_stages(config: MuscConfig) -> list[Stage]:
    """MuSC's stages in order, with what each reads and needs."""
    own = ("coarse.self_instruct", "self_instruct_constraints") if config.instructions == SELF_INSTRUCT else ()
    return [
        Stage("instructions", instructions, reads=(*MODEL, "instructions", "n", "seed", *own), files=("instructions",),
              code=(musc_prompts,)),
        Stage("decompose", sharded_step(coarse.decompose, "helper"), reads=(*SHARDED, "coarse.decompose",
              "coarse.helper", "coarse.min_constraints"), needs=("instructions",), code=(coarse, musc_prompts),
              resumable=True),
        Stage("contrast", sharded_step(coarse.contrast, "helper"), reads=(*SHARDED, "coarse.recombine",
              "coarse.corruption", "coarse.helper", "coarse.min_constraints", "coarse.seed"), needs=("decompose",),
              code=(coarse, musc_prompts), resumable=True),
        Stage("respond", sharded_step(coarse.respond, "respond"), reads=(*SHARDED, "coarse.respond",
              "coarse.drop_unfinished"), needs=("contrast",), code=(coarse, prompts), resumable=True),
        Stage("token_weights", weigh, reads=(*SHARDED, "weights"), needs=("respond",), code=(tokens, prompts),
              resumable=True),
    ]


def run_musc(config: MuscConfig, until: str = "tdpo", force: bool = False) -> dict[str, StageResult]:
    """Validate, then run (or resume) the MuSC stages up to and including `until`."""
    config.validate()
    run = Run(Path(config.runs_dir) / config.run_name / "musc", config.identity(), force=force)
    shared = Shared(load_tokenizer(config.adapter or config.model), ModelBank(config.model, config.quantization))
    return run.execute(musc_stages(config), config, until, shared)
