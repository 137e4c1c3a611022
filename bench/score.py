"""`score`: our batched likelihood scorer against a naive loop that scores one pair at a time from full logits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from bench.measure import free_memory, peak_gib, random_examples, timed
from bench.sft import LORA
from bench.shapes import build_shape
from mainlib.models import add_lora, load_model
from mainlib.prompts import Encoded
from mainlib.scoring import ScoringSettings, score_encoded


@dataclass
class ScoreCase:
    shape: str
    pairs: int = 128
    lengths: tuple[int, int] = (256, 1024)
    warmup: int = 1
    repeats: int = 3


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
    path = build_shape(case.shape)
    free_memory()
    torch.manual_seed(0)
    model = add_lora(load_model(str(path)), LORA).eval()
    vocab = model.config.vocab_size
    examples = random_examples(case.pairs, case.lengths, vocab, seed=1)
    targets = sum(len(e.target_ids) for e in examples)
    settings = ScoringSettings()

    free_memory()
    stock_times = timed(lambda i: naive_means(model, examples), case.warmup, case.repeats)
    stock_peak = peak_gib()
    free_memory()
    ours_times = timed(lambda i: score_encoded(model, examples, settings), case.warmup, case.repeats)
    ours_peak = peak_gib()

    ours = [s.mean for s in score_encoded(model, examples, settings)]
    naive = naive_means(model, examples)
    worst = max(abs(a - b) for a, b in zip(ours, naive, strict=True))
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
    return {
        "case": asdict(case),
        "scoring_settings": asdict(settings),
        "stock": _rates(stock_times.median, case.pairs, targets, stock_peak),
        "ours": _rates(ours_times.median, case.pairs, targets, ours_peak),
        "speedup": stock_times.median / ours_times.median,
        "check": {"mean_logp_max_abs_diff": {"value": worst, "tolerance": tolerance, "ok": worst <= tolerance}},
    }


def _rates(seconds: float, pairs: int, targets: int, peak: float | None) -> dict:
    return {
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "target_tokens_per_s": targets / seconds,
        "peak_gib": peak,
    }
