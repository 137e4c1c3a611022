"""MAIN's pieces: α schedules, synthesis drop reasons, selection, the random baseline, ratings, and the scorer's
ground truth."""

from __future__ import annotations

import itertools
import math

import pytest

from mainlib.data import Pair
from mainlib.generate import Generation
from mainlib.mutual import (
    MainSettings,
    PoolScores,
    alpha_schedule,
    clean_synthesis,
    filter_scores,
    parse_rating,
    random_scores,
    roc_auc,
    select,
    shuffled_pairs,
    zscore,
)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_alpha_schedules_hit_their_endpoints(kind: str) -> None:
    alphas = alpha_schedule(kind, 0.1, 0.5, 5)
    assert len(alphas) == 5 and alphas[0] == pytest.approx(0.1)
    assert alphas[-1] == pytest.approx(0.1 if kind == "constant" else 0.5)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(alphas))
    assert alpha_schedule(kind, 0.1, 0.5, 1) == [0.1] and alpha_schedule(kind, 0.1, 0.5, 0) == []


def test_linear_and_cosine_midpoints() -> None:
    assert alpha_schedule("linear", 0.1, 0.5, 3)[1] == pytest.approx(0.3)
    cosine = alpha_schedule("cosine", 0.0, 1.0, 5)
    assert cosine[2] == pytest.approx(0.5) and cosine[1] == pytest.approx((1 - math.cos(math.pi / 4)) / 2)


def test_synthesis_counts_every_drop_reason() -> None:
    pool = [Pair("", f"response {i}", "pool") for i in range(6)]
    generations = [
        Generation("Write a poem.", "eos", 4),
        Generation("   ", "eos", 1),
        Generation("Write a long", "length", 8),
        Generation("write a  poem.", "eos", 4),  # duplicate after whitespace and case folding
        Generation("Explain tides.", "eos", 3),
        Generation("", "length", 8),  # empty wins over truncated
    ]
    result = clean_synthesis(pool, generations)
    assert [(p.instruction, p.response) for p in result.pairs] == [
        ("Write a poem.", "response 0"),
        ("Explain tides.", "response 4"),
    ]
    assert result.dropped == {"empty": 2, "truncated": 1, "duplicate": 1}
    assert [r["dropped"] for r in result.rows] == [None, "empty", "truncated", "duplicate", None, "empty"]


@pytest.mark.parametrize("n", [1, 7, 10, 33])
@pytest.mark.parametrize("fraction", [0.01, 0.3, 0.5, 1.0])
def test_select_keeps_exactly_ceil_fraction(n: int, fraction: float) -> None:
    scores = [((i * 37) % 11) / 3 for i in range(n)]
    kept = select(scores, top_fraction=fraction)
    assert len(kept) == math.ceil(fraction * n)
    assert min(scores[i] for i in kept) >= max((scores[i] for i in range(n) if i not in kept), default=-1e9)


def test_select_by_threshold_and_bad_input() -> None:
    assert select([0.1, 0.9, 0.5], threshold=0.5) == [1, 2]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"top_fraction must be in \(0, 1\]"):
            select([1.0], top_fraction=bad)
    with pytest.raises(ValueError, match="exactly one"):
        select([1.0], top_fraction=0.5, threshold=0.0)


def test_settings_errors_say_what_to_change() -> None:
    with pytest.raises(
        ValueError,
        match=r"parameter filter_method: got 'best'; allowed: 'mutual' \| 'forward' \| 'reverse' \| 'random' \| "
        r"'humpback' \| 'none'",
    ):
        MainSettings(filter_method="best").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"use 1.0 to keep all"):
        MainSettings(top_fraction=2.0).validate()
    MainSettings().validate()


def test_mutual_score_is_the_z_combination() -> None:
    scores = PoolScores(
        forward=[-1.0, -2.0, -3.0],
        reverse=[-4.0, -2.0, -3.0],
        forward_unconditional=[-2.0, -2.0, -2.0],
        reverse_unconditional=[-3.0, -3.0, -1.0],
    )
    assert scores.s_f("pmi") == [1.0, 0.0, -1.0] and scores.s_r("none") == [-4.0, -2.0, -3.0]
    mutual = filter_scores(scores, "mutual", "pmi", lam=0.25)
    expected = [0.25 * a + 0.75 * b for a, b in zip(zscore([1.0, 0.0, -1.0]), zscore([-1.0, 1.0, -2.0]), strict=True)]
    assert mutual == pytest.approx(expected)
    assert sum(zscore([1.0, 2.0, 6.0])) == pytest.approx(0.0) and zscore([2.0, 2.0]) == [0.0, 0.0]


@pytest.mark.parametrize(("n", "fraction"), [(10, 0.3), (33, 0.5), (7, 0.01)])
def test_random_filter_keeps_a_seeded_subset_of_the_same_size(n: int, fraction: float) -> None:
    scores = PoolScores(*[[-float(i) for i in range(n)]] * 4)  # any scores: the random filter ignores them
    kept = {seed: select(filter_scores(scores, "random", "pmi", 0.5, seed=seed), fraction) for seed in (0, 1)}
    assert len(kept[0]) == len(select(filter_scores(scores, "mutual", "pmi", 0.5), fraction)) == math.ceil(fraction * n)
    assert kept[0] == select(filter_scores(scores, "random", "pmi", 0.5, seed=0), fraction)  # reproducible
    assert kept[0] != kept[1]  # another seed, another subset
    assert all(0.0 <= v < 1.0 for v in random_scores(n, 0)) and len(set(random_scores(n, 0))) == n


def test_random_filter_is_not_the_pool_sampling_stream() -> None:
    """The pool is sampled with `random.Random(seed)`: the filter's draws must not repeat that stream."""
    import random

    stream = random.Random(3)
    assert random_scores(5, 3) != [stream.random() for _ in range(5)]


@pytest.mark.parametrize(
    ("text", "rating"),
    [
        ("Score: 4", 4),
        ("score=5 because it is great", 5),
        ("I would rate this 3/5.", 3),
        ("2", 2),
        ("The answer is good. Score: 1", 1),
        ("", None),
        ("Great answer!", None),
        ("Score: 7", None),
        ("rated 4.5", None),
    ],
)
def test_parse_rating(text: str, rating: int | None) -> None:
    assert parse_rating(text) == rating


def test_roc_auc_and_shuffle() -> None:
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1], [2]) == 0.0 and roc_auc([1, 2], [1, 2]) == 0.5
    pairs = [Pair(f"i{k}", f"r{k}") for k in range(6)]
    shuffled = shuffled_pairs(pairs, seed=1)
    assert all(
        s.instruction != p.instruction and s.response == p.response for s, p in zip(shuffled, pairs, strict=True)
    )
    assert sorted(s.instruction for s in shuffled) == sorted(p.instruction for p in pairs)


@pytest.mark.slow
@pytest.mark.heavy  # 320 forward passes of the 135M model: 3.5 minutes of one core (make test-all)
def test_ground_truth_auc_with_the_bundled_model() -> None:
    """Untrained SmolLM2 scores 40 held-out true pairs against the same responses with shuffled instructions."""
    from mainlib import data
    from mainlib.adapters import ModelBank
    from mainlib.models import load_tokenizer
    from mainlib.mutual import ground_truth_auc

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    bank = ModelBank("smollm2-135m-instruct")  # no adapter: both directions are the plain base
    pairs, _ = data.clean_pairs(data.load_bundled("heldout"), tokenizer, max_tokens=384)
    auc = ground_truth_auc(bank, tokenizer, pairs[:40], adapters=(None, None))
    print("ground-truth ROC-AUC, true vs shuffled (40 pairs):", {k: round(v, 3) for k, v in auc.items()})
    assert set(auc) == {f"{m}_{n}" for m in ("forward", "reverse", "mutual") for n in ("pmi", "none")}
    assert auc["mutual_pmi"] >= 0.9  # measured 0.969
    assert auc["mutual_pmi"] > auc["mutual_none"]  # measured 0.714


def test_rating_rubric_is_documented_verbatim() -> None:
    from pathlib import Path

    from mainlib.mutual import RATING_PROMPT

    assert RATING_PROMPT in (Path(__file__).resolve().parents[1] / "docs" / "ALGORITHMS.md").read_text()


def test_the_select_stage_draws_the_random_filter_with_the_run_seed(tmp_path) -> None:
    """`seed` is among the select stage's declared reads (an undeclared read raises), and it seeds the draw."""
    from types import SimpleNamespace

    from mainlib import pipeline, shards
    from mainlib.config import MainConfig
    from mainlib.stages import ConfigView, StageContext

    rows = [dict.fromkeys(("forward", "reverse", "forward_unconditional", "reverse_unconditional"), -1.0)] * 9
    shards.run_sharded(tmp_path / "score", rows, 4, lambda chunk, index: chunk, fingerprint="f", desc="score")
    stage = next(s for s in pipeline.main_stages(MainConfig()) if s.name == "select")

    def kept(seed: int) -> list[int]:
        config = MainConfig(seed=seed, main=MainSettings(filter_method="random", top_fraction=0.3))
        view = ConfigView(config, stage.reads, "select")
        ctx = StageContext(stage, view, tmp_path / "select", {"score": SimpleNamespace(dir=tmp_path / "score")}, "f")
        values, chosen = pipeline.filter_values(ctx)
        assert values == random_scores(9, seed)
        return chosen

    assert len(kept(0)) == 3 and kept(0) == kept(0) and kept(0) != kept(1)


def test_score_pool_scores_each_unconditional_target_once_with_the_same_numbers(tiny_model_dir, tiny_tokenizer):
    """The shuffled half of a ground-truth check repeats every target: scored once, each pair still gets its own."""
    from mainlib.adapters import ModelBank
    from mainlib.mutual import score_pool, shuffled_pairs
    from mainlib.scoring import score_pairs

    bank = ModelBank(str(tiny_model_dir), "none")
    true = [Pair("Name a fruit.", "An apple."), Pair("Add 2 and 3.", "5"), Pair("Say hi.", "Hello there!")]
    pairs = true + shuffled_pairs(true, seed=0)
    scores = score_pool(bank, tiny_tokenizer, pairs, adapters=(None, None))
    with bank.use(None) as model:
        for direction in ("forward", "reverse"):
            for unconditional in (False, True):
                want = [s.mean for s in score_pairs(model, tiny_tokenizer, direction, pairs, None, None, unconditional)]
                got = getattr(scores, direction + ("_unconditional" if unconditional else ""))
                assert got == pytest.approx(want, abs=1e-5), (direction, unconditional)
    assert scores.forward_unconditional[:3] == scores.forward_unconditional[3:]  # the same responses
