"""`score`: our batched likelihood scorer against a naive loop that scores one pair at a time from full logits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bench.measure import free_memory, peak_gib, random_examples, stock_quantization, timed, trace
from bench.sft import adapted_model
from bench.shapes import build_shape
from mainlib.generate import merged_for_inference
from mainlib.prompts import Encoded
from mainlib.scoring import ScoringSettings, score_encoded


@dataclass
class ScoreCase:
    shape: str
    pairs: int = 128
    lengths: tuple[int, int] = (256, 1024)
    warmup: int = 1
    repeats: int = 3
    # Our scorer at these rows per forward (None: mainlib's default, 64 on CUDA and 1 on CPU); `ours` is the first.
    max_batch_sizes: tuple[int | None, ...] = (None,)
    # also: the adapter merged into a bf16 copy (`merged_for_inference`): no LoRA matmuls, and no 4-bit
    # dequantisation on a GPU
    merged_bf16: bool = True


# |mean log p| difference per pair against the fp32 naive loop: fp32 paths differ only by summation order; bf16
# weights keep 8 mantissa bits (relative rounding 2^-9 per weight), which moves a mean log p over a 49k vocabulary
# by about 1e-3 (measured), so 5e-2 leaves room without hiding a wrong target position (which moves it by > 1).
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 5e-2


@torch.no_grad()
def naive_means(model, examples: list[Encoded]) -> list[float]:
    """What one writes first: a forward per pair, log-softmax over the full logits, mean over target tokens."""
    device = next(model.parameters()).device
    means = []
    for e in examples:
        logits = model(input_ids=torch.tensor([e.input_ids], device=device)).logits[0, :-1].float()
        targets = torch.tensor(e.labels[1:], device=device)
        keep = targets != -100
        logp = torch.log_softmax(logits[keep], -1).gather(-1, targets[keep, None]).squeeze(-1)
        means.append(logp.mean().item())
    return means


def run(case: ScoreCase) -> dict:
    """The naive loop on the stock load (fp32 on CPU, 4-bit on CUDA), then our scorer on mainlib's default load
    at each row count, then (optionally) on a merged bf16 copy; every variant is checked against the naive loop."""
    path = build_shape(case.shape)
    free_memory()
    stock_model = adapted_model(path, stock_quantization())
    vocab = stock_model.config.vocab_size
    examples = random_examples(case.pairs, case.lengths, vocab, seed=1)
    targets = sum(len(e.target_ids) for e in examples)
    free_memory()
    stock_times = timed(lambda i: naive_means(stock_model, examples), case.warmup, case.repeats)
    record: dict = {"case": asdict(case), "stock": _rates(stock_times.median, case.pairs, targets, peak_gib())}
    record["stock"]["trace"] = trace(lambda: naive_means(stock_model, examples))
    record["variants"], record["check"] = {}, {}
    naive = naive_means(stock_model, examples)
    model = adapted_model(path, "auto")
    runs = [
        (f"rows_{rows}" if rows else "default", model, ScoringSettings(max_batch_size=rows))
        for rows in case.max_batch_sizes
    ]
    if case.merged_bf16:
        runs.append(("merged_bf16", merged_for_inference(model, torch.bfloat16), ScoringSettings()))
    for name, scorer, settings in runs:
        free_memory()
        times = timed(lambda i, m=scorer, s=settings: score_encoded(m, examples, s), case.warmup, case.repeats)
        result = _rates(times.median, case.pairs, targets, peak_gib())
        record["variants"][name] = {
            **result,
            "settings": asdict(settings),
            "weights_dtype": str(scorer.dtype),
            "speedup": stock_times.median / times.median,
            "trace": trace(lambda m=scorer, s=settings: score_encoded(m, examples, s)),
        }
        ours = [s.mean for s in score_encoded(scorer, examples, settings)]
        worst = max(abs(a - b) for a, b in zip(ours, naive, strict=True))
        allowed = FP32_TOLERANCE if scorer.dtype == torch.float32 else BF16_TOLERANCE
        record["check"][f"{name}_mean_logp_max_abs_diff"] = {
            "value": worst,
            "tolerance": allowed,
            "ok": worst <= allowed,
        }
    first = next(iter(record["variants"]))
    record["ours"] = {**record["variants"][first], "name": first}
    record["speedup"] = record["ours"]["speedup"]
    return record


def _rates(seconds: float, pairs: int, targets: int, peak: float | None) -> dict:
    return {
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "target_tokens_per_s": targets / seconds,
        "peak_gib": peak,
    }
