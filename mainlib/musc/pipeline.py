"""MuSC (ALGORITHMS.md §2) as declared stages (`stages.Run`) in `runs/<run_name>/musc/<stage>/`:

    instructions -> decompose -> contrast -> respond -> token_weights -> tdpo

Each stage declares the config fields it reads, so a changed field reruns exactly the stages that read it and
those after them. The generation steps and the token weights stream the previous stage's rows in shards
(`shards.run_sharded`, `shard_size` rows each, each shard sampling with its own seed): a killed stage resumes at
its first missing shard with the bytes an uninterrupted run writes, and memory holds one shard, not the pool.

One base model for the whole run (`adapters.ModelBank`): the starting policy is the plain base, or the base with
`config.adapter` as a frozen adapter; `tdpo` trains a new adapter in the same bank (fresh, or the starting one
loaded trainable) with token-weighted DPO and saves it in `tdpo/model`.

`respond` writes the preference rows {prompt, chosen, rejected, noised_prompt, constraints, corruption, ...};
`token_weights` adds each response's per-token weights from the frozen starting policy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mainlib import data, distributed, generate, prompts, shards
from mainlib.adapters import ModelBank, Shared, same_model
from mainlib.config import SELF_INSTRUCT, MuscConfig, validate
from mainlib.generate import Generation, GenerationSettings
from mainlib.models import load_tokenizer, read_adapter_config
from mainlib.musc import coarse, tokens
from mainlib.musc import prompts as musc_prompts
from mainlib.musc import tdpo as weighted_dpo
from mainlib.musc.heldout import heldout_accuracy, split_heldout
from mainlib.musc.tdpo import DPOResult
from mainlib.parameters import ConfigError, Problem
from mainlib.results import write_json, write_jsonl
from mainlib.stages import Run, Stage, StageContext, StageResult

STAGES = ("instructions", "decompose", "contrast", "respond", "token_weights", "tdpo")
MODEL = ("model", "adapter", "quantization")  # read by every stage that runs the policy: its fingerprint says which
POLICY = "policy"  # the bank's name of the starting adapter (frozen), when there is one
TRAINED = "musc"  # the bank's name of the adapter `tdpo` trains
INSTRUCTIONS_FILE = "instructions.jsonl"
ROWS = {
    "decompose": "decompositions",
    "contrast": "contrasts",
    "respond": "preferences",
    "token_weights": "preferences",
}
Row = dict[str, Any]

__all__ = ["STAGES", "MuscConfig", "MuscState", "load_instructions", "musc_stages", "run_musc"]  # MuscConfig: config


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


# -- the policy, from the one bank ----------------------------------------------------------------------------


def start_policy(ctx: StageContext) -> str | None:
    """The starting policy's adapter in the bank (`config.adapter`, frozen, loaded once for all stages), or None
    for the plain base."""
    adapter = ctx.config.adapter
    return None if adapter is None else ctx.shared.bank.ensure(POLICY, adapter)


def policy_writer(ctx: StageContext, index: int | None = None) -> coarse.Complete:
    """The starting policy as the coarse steps' `Complete`. Shard `index` samples with `shard_seed(seed, index)`,
    so a resumed stage writes what an uninterrupted one would; the model is taken from the bank at the first
    call, so a step that writes nothing (`decompose="given"`) loads no model."""

    def complete(texts: Sequence[str], settings: GenerationSettings, desc: str) -> list[Generation]:
        if index is not None:
            settings = dataclasses.replace(settings, seed=shards.shard_seed(settings.seed, index))
        with ctx.shared.bank.generator(start_policy(ctx), settings) as model:
            return coarse.writer(model, ctx.shared.tokenizer)(texts, settings, desc)

    return complete


def shard_counts(summary: shards.ShardSummary) -> dict[str, Any]:
    """A sharded step's counts summed over its shards (what one call over all rows counts), plus the sharding
    under `shards` (a dict, so the survival table leaves it out)."""
    counts: dict[str, Any] = {**summary.counts}
    counts.setdefault("kept", 0)  # an empty input has no shard to count it
    counts["shards"] = {"total": len(summary.shards), "resumed": summary.resumed}
    return counts


def run_shards(ctx: StageContext, rows: Iterable[Row], work: shards.Work, **options: Any) -> shards.ShardSummary:
    """`shards.run_sharded` into the stage's folder, tagged with its fingerprint."""
    size = ctx.config.shard_size
    return shards.run_sharded(ctx.dir, rows, size, work, fingerprint=ctx.fingerprint, desc=ctx.stage.name, **options)


# -- the stages -----------------------------------------------------------------------------------------------


def instructions(ctx: StageContext) -> dict[str, Any]:
    """The complex instructions: a sample of a pool, or written by the starting policy ("self")."""
    c = ctx.config
    if c.instructions == SELF_INSTRUCT:
        with ctx.shared.bank.engine_scope():
            records, counts = coarse.self_instruct(
                c.n or 24, ctx.shared.tokenizer, policy_writer(ctx), c.coarse, c.self_instruct_constraints
            )
    else:
        pool = load_instructions(c.instructions)
        records, _ = data.sample_pairs(pool, c.n, c.seed)  # any list samples the same way
        counts = {"available": len(pool), "kept": len(records)}
    write_jsonl(ctx.dir / INSTRUCTIONS_FILE, records)
    return counts


def coarse_step(ctx: StageContext, step: Callable, rows: Iterable[Row]) -> dict[str, Any]:
    """A coarse step (`coarse.decompose` / `contrast` / `respond`) over `rows`, one shard at a time."""

    def work(chunk: list[Row], index: int) -> tuple[list[Row], dict[str, int]]:
        return step(chunk, ctx.shared.tokenizer, policy_writer(ctx, index), ctx.config.coarse)

    with ctx.shared.bank.engine_scope():
        return shard_counts(run_shards(ctx, rows, work))


def decompose(ctx: StageContext) -> dict[str, Any]:
    """Step 1: each instruction's input and atomic constraints."""
    path = ctx.inputs["instructions"].dir / INSTRUCTIONS_FILE
    return coarse_step(ctx, coarse.decompose, (record for _, record in data.jsonl_records(path)))


def contrast(ctx: StageContext) -> dict[str, Any]:
    """Steps 2–3: the corrupted constraints, and the clean and corrupted instructions x and x′."""
    return coarse_step(ctx, coarse.contrast, shards.iter_rows(ctx.inputs["decompose"].dir))


def respond(ctx: StageContext) -> dict[str, Any]:
    """Step 4: y_w ~ π(·|x), y_l ~ π(·|x′), the preference rows."""
    return coarse_step(ctx, coarse.respond, shards.iter_rows(ctx.inputs["contrast"].dir))


def weigh_shard(ctx: StageContext, rows: list[Row]) -> tuple[list[Row], dict[str, int]]:
    """One shard's token weights (no sampling: nothing to seed); memory holds this shard's hidden states only."""
    x, x_prime = [r["prompt"] for r in rows] * 2, [r["noised_prompt"] for r in rows] * 2
    y = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    with ctx.shared.bank.use(start_policy(ctx)) as model:
        weights = tokens.token_weights(model, ctx.shared.tokenizer, x, x_prime, y, ctx.config.weights)
    kept, counts = tokens.weigh_pairs(rows, weights[: len(rows)], weights[len(rows) :], ctx.config.weights.zero_weights)
    flat = all_weights(kept)
    return kept, {**counts, "tokens": len(flat), "zero_weight_tokens": sum(w == 0 for w in flat)}


def all_weights(rows: Iterable[Row]) -> list[float]:
    """Every response token's weight in `rows`, chosen and rejected."""
    return [w for r in rows for side in ("chosen", "rejected") for w in r[f"{side}_weights"]["weights"]]


def token_weights(ctx: StageContext) -> dict[str, Any]:
    """Each response token's weight: how much the frozen starting policy's prediction depends on the constraints."""
    rows = shards.iter_rows(ctx.inputs["respond"].dir)
    summary = run_shards(
        ctx, rows, lambda chunk, _: weigh_shard(ctx, chunk), stats=lambda r: {"weight": all_weights(r)}
    )
    weight = summary.moments.get("weight")
    return {**shard_counts(summary), "mean_weight": weight.mean if weight and weight.count else 0.0}


def start_training(ctx: StageContext) -> None:
    """The adapter `tdpo` trains, in the same bank: the starting adapter loaded trainable, or a fresh LoRA."""
    bank, c = ctx.shared.bank, ctx.config
    if c.adapter is not None:
        bank.ensure(TRAINED, c.adapter, trainable=True)
        return
    if TRAINED in bank.names:
        bank.drop(TRAINED)
    bank.add(TRAINED, c.lora, seed=c.dpo.seed)


def tdpo(ctx: StageContext) -> dict[str, Any]:
    """A LoRA adapter trained with token-weighted DPO on the weighted pairs, saved in `tdpo/model`; with
    `heldout_fraction`, trained on the rest and measured on the pairs held out (`heldout.json`)."""
    c, tokenizer = ctx.config, ctx.shared.tokenizer
    rows = list(shards.iter_rows(ctx.inputs["token_weights"].dir))
    if not rows:
        raise ValueError(
            "no preference pair survived the coarse steps (see the counts of decompose/contrast/respond); "
            "raise n, response_max_new_tokens, or use decompose='given' / recombine='template'"
        )
    rows, held = split_heldout(rows, c.heldout_fraction, c.seed) if c.heldout_fraction else (rows, [])
    start_training(ctx)
    result = weighted_dpo.train_bank_tdpo(ctx.shared.bank, TRAINED, tokenizer, rows, c.dpo, ctx.dir / "trainer")
    saved = {"start_adapter": c.adapter, "lora": asdict(c.lora), "dpo": c.dpo.to_dict(), "weights": asdict(c.weights)}
    ctx.shared.bank.save(TRAINED, ctx.dir / "model", tokenizer, saved)  # the bank adds base_model, quantization
    distributed.on_main(lambda: write_json(ctx.dir / "dpo_result.json", result.to_dict()))
    counts = {**result.counts, "seconds": result.seconds}
    if held:
        accuracy = heldout_report(ctx, held)
        distributed.on_main(lambda: write_json(ctx.dir / "heldout.json", accuracy))
        counts |= {"heldout_pairs": len(held), "heldout_accuracy": accuracy["weighted"]["accuracy"]}
    return counts


def heldout_report(ctx: StageContext, held: list[Row]) -> dict[str, Any]:
    """The trained adapter's preference accuracy on the held-out pairs against the policy it started from, with
    the token weights it was trained under and with uniform ones (the same yardstick for every weight mode)."""
    reference = start_policy(ctx)
    return {
        kind: heldout_accuracy(
            ctx.shared.bank, TRAINED, ctx.shared.tokenizer, held, ctx.config.dpo, reference, weighted=weighted
        ).to_dict()
        for kind, weighted in (("weighted", True), ("uniform", False))
    }


def sharded(
    name: str,
    compute: Callable[[StageContext], dict[str, Any]],
    reads: tuple[str, ...],
    needs: str,
    code: tuple[ModuleType, ...],
) -> Stage:
    """A resumable stage over the rows of the stage it needs, in shards of `shard_size`."""
    return Stage(
        name, compute, reads=("shard_size", *reads), needs=(needs,), code=code, resumable=True, every_process=True
    )


def musc_stages(config: MuscConfig) -> list[Stage]:
    """MuSC's stages in order, each declaring exactly what it reads (model, fields, files, prompt code)."""
    if config.instructions == SELF_INSTRUCT:
        own = (*MODEL, "instructions", "n", "self_instruct_constraints", "coarse.self_instruct")
        source = Stage("instructions", instructions, reads=own, code=(coarse, musc_prompts, generate))
    else:
        own = ("instructions", "n", "seed")
        source = Stage("instructions", instructions, reads=own, files=("instructions",), code=(data,))
    writes = (*MODEL, "coarse.helper") if config.coarse.decompose == "model" else ()  # "given": no model
    split = ("coarse.decompose", "coarse.min_constraints", *writes)
    corrupt = (*MODEL, "coarse.corruption", "coarse.seed", "coarse.helper", "coarse.recombine")
    answer = (*MODEL, "coarse.respond", "coarse.drop_unfinished")
    train = (*MODEL, "lora", "dpo", "weights", "heldout_fraction", "seed")
    return [
        source,
        sharded("decompose", decompose, split, "instructions", (coarse, musc_prompts, generate)),
        sharded("contrast", contrast, corrupt, "decompose", (coarse, musc_prompts, generate)),
        sharded("respond", respond, answer, "contrast", (coarse, prompts, generate)),
        sharded("token_weights", token_weights, (*MODEL, "weights"), "respond", (tokens, prompts)),
        Stage("tdpo", tdpo, reads=train, needs=("token_weights",), code=(weighted_dpo, prompts), every_process=True),
    ]


# -- the run --------------------------------------------------------------------------------------------------


@dataclass
class MuscState:
    """What the stages produced (read back from their folders, computed now or not)."""

    counts: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> its counts
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> compute time (when it was computed)
    ran: list[str] = field(default_factory=list)
    decompositions: list[dict[str, Any]] = field(default_factory=list)
    contrasts: list[dict[str, Any]] = field(default_factory=list)
    preferences: list[dict[str, Any]] = field(default_factory=list)  # with weights after `token_weights`
    training: DPOResult | None = None
    adapter_dir: Path | None = None
    heldout: dict[str, Any] | None = None  # tdpo's heldout.json, with `heldout_fraction`

    @classmethod
    def from_results(cls, results: dict[str, StageResult]) -> MuscState:
        """The state of the stages run (or skipped) up to `until`, rows loaded from their shards."""
        state = cls()
        for name, result in results.items():  # in stage order: token_weights' rows replace respond's
            state.counts[name], state.seconds[name] = result.manifest["counts"], result.manifest["seconds"]
            if not result.skipped:
                state.ran.append(name)
            if name in ROWS:
                setattr(state, ROWS[name], list(shards.iter_rows(result.dir)))
        if "tdpo" in results:
            state.training = DPOResult(**json.loads((results["tdpo"].dir / "dpo_result.json").read_text()))
            state.adapter_dir = results["tdpo"].dir / "model"
            if (heldout := results["tdpo"].dir / "heldout.json").is_file():
                state.heldout = json.loads(heldout.read_text())
        return state

    def survival(self) -> list[dict[str, Any]]:
        """How many instructions are left after each step (the table the notes and notebook report)."""
        rows = []
        for stage in ("instructions", "decompose", "contrast", "respond", "tdpo"):
            if stage in self.counts:
                counts = self.counts[stage]
                dropped = {
                    k: v for k, v in counts.items() if k not in ("kept", "optimizer_steps") and isinstance(v, int)
                }
                rows.append({"step": stage, "left": counts.get("kept"), "counts": dropped})
        return rows


def check_start_adapter(config: MuscConfig) -> None:
    """The starting adapter must have been trained on `config.model`: the run's one bank holds that base."""
    if config.adapter is None:
        return
    trained_on = str(read_adapter_config(config.adapter).get("base_model"))
    if not same_model(trained_on, config.model):
        allowed = f"an adapter trained on model {config.model!r}; this one was trained on {trained_on!r} (set model)"
        raise ConfigError([Problem("adapter", "adapter", config.adapter, allowed)], where="MuscConfig")


def run_musc(config: MuscConfig, until: str = "tdpo", force: bool = False) -> MuscState:
    """Run (or resume) the MuSC stages up to and including `until`, after checking the whole config (no model
    loads before that)."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {', '.join(STAGES)}; got {until!r}")
    validate(config)
    check_start_adapter(config)
    run = Run(Path(config.runs_dir) / config.run_name / "musc", config.identity(), force=force)
    bank = ModelBank(config.model, config.quantization, config.dpo.gradient_checkpointing, vllm=config.vllm)
    shared = Shared(load_tokenizer(config.adapter or config.model), bank)
    return MuscState.from_results(run.execute(musc_stages(config), config, until, shared))
