"""MuSC as resumable stages (ALGORITHMS.md §2), in `runs/<run_name>/musc/<stage>/` (see `stages.Run`):

    instructions -> decompose -> contrast -> respond -> token_weights -> tdpo

`respond` writes the preference JSONL {prompt, chosen, rejected, noised_prompt, constraints, corruption};
`token_weights` adds each response's per-token weights (from the frozen starting policy); `tdpo` trains a
LoRA adapter with token-weighted DPO and saves it in `tdpo/model`. The policy is the base model, or the
base with a trained adapter (e.g. MAIN's `final_sft/model`).
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mainlib import data
from mainlib.config import SELF_INSTRUCT, MuscConfig, validate
from mainlib.models import (
    load_adapter,
    load_model,
    load_tokenizer,
    lora_config,
    prepare_for_lora,
    save_adapter,
)
from mainlib.musc.coarse import contrast, decompose, respond, self_instruct, writer
from mainlib.musc.tdpo import DPOResult, train_tdpo
from mainlib.musc.tokens import token_weights
from mainlib.results import write_json, write_jsonl
from mainlib.stages import Run

STAGES = ("instructions", "decompose", "contrast", "respond", "token_weights", "tdpo")


__all__ = ["STAGES", "MuscConfig", "MuscState", "load_instructions", "run_musc"]  # MuscConfig: see mainlib.config


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


@dataclass
class MuscState:
    """What the stages produced (read back from disk for skipped stages)."""

    counts: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> its counts
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> compute time (when it was computed)
    ran: list[str] = field(default_factory=list)
    decompositions: list[dict[str, Any]] = field(default_factory=list)
    contrasts: list[dict[str, Any]] = field(default_factory=list)
    preferences: list[dict[str, Any]] = field(default_factory=list)  # with weights after `token_weights`
    training: DPOResult | None = None
    adapter_dir: Path | None = None

    def survival(self) -> list[dict[str, Any]]:
        """How many instructions are left after each step (the table the notes and notebook report)."""
        rows = []
        for stage, key in (
            ("instructions", "kept"),
            ("decompose", "kept"),
            ("contrast", "kept"),
            ("respond", "kept"),
            ("tdpo", "kept"),
        ):
            if stage in self.counts:
                counts = self.counts[stage]
                dropped = {k: v for k, v in counts.items() if k not in (key, "optimizer_steps") and isinstance(v, int)}
                rows.append({"step": stage, "left": counts.get(key), "counts": dropped})
        return rows


def run_musc(config: MuscConfig, until: str = "tdpo", force: bool = False) -> MuscState:
    """Run (or resume) the MuSC stages up to and including `until`."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {', '.join(STAGES)}; got {until!r}")
    validate(config)  # everything checkable without a model, before the first stage
    last = STAGES.index(until)
    tokenizer = load_tokenizer(config.adapter or config.model)
    run = Run(Path(config.runs_dir) / config.run_name / "musc", config.identity(), force=force)
    state = MuscState()
    held: dict[str, Any] = {}

    def policy():
        """The starting policy, frozen (base, or base + adapter), loaded once."""
        if "policy" not in held:
            if config.adapter:
                held["policy"] = load_adapter(config.adapter, config.quantization)[0]
            else:
                held["policy"] = load_model(config.model, config.quantization)
        return held["policy"]

    def record(stage) -> None:
        state.counts[stage.name] = stage.manifest["counts"]
        state.seconds[stage.name] = stage.manifest["seconds"]
        if not stage.skipped:
            state.ran.append(stage.name)

    def finish(stage, rows_file: str) -> list[dict[str, Any]]:
        record(stage)
        return data.load_jsonl(stage.dir / rows_file)

    # -- instructions: from a pool, or written by the policy
    def do_instructions(out: Path) -> dict[str, Any]:
        if config.instructions == SELF_INSTRUCT:
            records, counts = self_instruct(
                config.n or 24, tokenizer, writer(policy(), tokenizer), config.coarse, config.self_instruct_constraints
            )
        else:
            records = load_instructions(config.instructions)
            picked, _ = data.sample_pairs(records, config.n, config.seed)  # any list samples the same way
            counts = {"available": len(records), "kept": len(picked)}
            records = picked
        write_jsonl(out / "instructions.jsonl", records)
        return counts

    inputs_config = {"instructions": config.instructions, "n": config.n, "seed": config.seed}
    if config.instructions == SELF_INSTRUCT:
        inputs_config |= {"constraints": config.self_instruct_constraints, "gen": asdict(config.coarse.self_instruct)}
    stage = run.stage("instructions", inputs_config, {}, do_instructions)
    records = finish(stage, "instructions.jsonl")
    previous = stage

    # -- decompose / contrast / respond: the coarse steps, each reading the previous stage's rows
    coarse, helper = config.coarse, asdict(config.coarse.helper)
    steps = (  # (stage, function, output file, the settings that stage depends on)
        ("decompose", decompose, "decompositions.jsonl", {"decompose": coarse.decompose, "helper": helper}),
        (
            "contrast",
            contrast,
            "contrasts.jsonl",
            {"recombine": coarse.recombine, "corruption": asdict(coarse.corruption), "helper": helper},
        ),
        ("respond", respond, "preferences.jsonl", {"respond": asdict(coarse.respond), "drop": coarse.drop_unfinished}),
    )
    shared = {"min_constraints": coarse.min_constraints, "seed": config.seed}
    for k, (name, step, rows_file, own) in enumerate(steps, start=1):
        if k > last:
            break

        def do_step(out: Path, step=step, rows=records, rows_file=rows_file) -> dict[str, Any]:
            produced, counts = step(rows, tokenizer, writer(policy(), tokenizer), config.coarse)
            write_jsonl(out / rows_file, produced)
            return counts

        stage = run.stage(name, {**shared, **own}, {"previous": previous.fingerprint}, do_step)
        records = finish(stage, rows_file)
        setattr(
            state, {"decompose": "decompositions", "contrast": "contrasts", "respond": "preferences"}[name], records
        )
        previous = stage

    # -- token_weights: how much each response token depends on the constraints (frozen starting policy)
    if last >= STAGES.index("token_weights"):

        def do_weights(out: Path) -> dict[str, Any]:
            rows = [dict(r) for r in records]
            if rows:
                x = [r["prompt"] for r in rows] * 2
                x_prime = [r["noised_prompt"] for r in rows] * 2
                y = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
                weights = token_weights(policy(), tokenizer, x, x_prime, y, config.weights)
                for r, w_chosen, w_rejected in zip(rows, weights[: len(rows)], weights[len(rows) :], strict=True):
                    r["chosen_weights"], r["rejected_weights"] = w_chosen.to_dict(), w_rejected.to_dict()
            write_jsonl(out / "preferences.jsonl", rows)
            flat = [w for r in rows for side in ("chosen", "rejected") for w in r[f"{side}_weights"]["weights"]]
            return {
                "pairs": len(rows),
                "tokens": len(flat),
                "mean_weight": sum(flat) / len(flat) if flat else 0.0,
                "zero_weight_tokens": sum(w == 0 for w in flat),
            }

        stage = run.stage("token_weights", asdict(config.weights), {"previous": previous.fingerprint}, do_weights)
        records = state.preferences = finish(stage, "preferences.jsonl")
        previous = stage

    # -- tdpo: a LoRA adapter trained with token-weighted DPO on the weighted pairs
    if last >= STAGES.index("tdpo"):

        def do_tdpo(out: Path) -> dict[str, Any]:
            if not records:
                raise ValueError(
                    "no preference pair survived the coarse steps (see the counts of decompose/contrast/respond); "
                    "raise n, response_max_new_tokens, or use decompose='given' / recombine='template'"
                )
            held.pop("policy", None)  # training loads its own trainable copy
            gc.collect()
            if config.adapter:  # TRL keeps a frozen copy of the starting adapter as the reference
                model, peft_config = load_adapter(config.adapter, config.quantization, is_trainable=True)[0], None
            else:  # a fresh adapter: the reference is the base with the adapter disabled
                model, peft_config = (
                    prepare_for_lora(load_model(config.model, config.quantization)),
                    lora_config(config.lora),
                )
            model, result = train_tdpo(model, tokenizer, records, config.dpo, out / "trainer", peft_config)
            if "ref" in model.peft_config:  # TRL's frozen copy of a starting adapter: not part of the result
                model.delete_adapter("ref")
            saved = {
                "base_model": config.model,
                "quantization": config.quantization,
                "start_adapter": config.adapter,
                "lora": asdict(config.lora),
                "dpo": config.dpo.to_dict(),
                "weights": asdict(config.weights),
            }
            save_adapter(model, tokenizer, out / "model", saved)
            write_json(out / "dpo_result.json", result.to_dict())
            return {**result.counts, "seconds": result.seconds}

        stage = run.stage(
            "tdpo",
            {"lora": asdict(config.lora), "dpo": config.dpo.to_dict()},
            {"previous": previous.fingerprint},
            do_tdpo,
        )
        record(stage)
        state.training = DPOResult(**json.loads((stage.dir / "dpo_result.json").read_text()))
        state.adapter_dir = stage.dir / "model"
    return state
