"""Sharded, resumable data stages: kill -9 and resume gives byte-identical output, memory stays flat with the
pool, streaming moments equal numpy's, and foreign or damaged shards are caught. Pure Python, no model."""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mainlib.shards import (
    RunningMoments,
    ShardMismatchError,
    count_rows,
    iter_rows,
    run_sharded,
    seed_all,
    shard_dir,
    shard_manifests,
    shard_seed,
)

REPO = Path(__file__).resolve().parents[1]
SEED, N, SIZE, FP = 1234, 103, 10, "stage-fp"  # 11 shards, the last one with 3 rows
SHARDS = 11


def sample_work(chunk: list[int], index: int) -> list[dict]:
    """A sampling stage: draws from random and numpy seeded per shard, drops some rows, ~20 kB per shard."""
    seed_all(shard_seed(SEED, index))
    rows = []
    for item in chunk:
        draw = random.random()
        if draw < 0.2:
            continue  # dropped, as synthesis drops empty or truncated instructions
        rows.append({"item": item, "draw": draw, "normal": float(np.random.standard_normal()), "pad": "é" * 1000})
    return rows


def draw_stats(rows: list[dict]) -> dict:
    return {"draw": [r["draw"] for r in rows if "draw" in r]}


def recording(calls: list[int]):
    def work(chunk: list[int], index: int) -> list[dict]:
        calls.append(index)
        return sample_work(chunk, index)

    return work


class Bomb:
    """Serialised (json's default=str) after the shard's real rows: kills the writer mid-file."""

    def __str__(self) -> str:
        os.kill(os.getpid(), signal.SIGKILL)
        return "unreachable"


def killed_run(out_dir: str, mode: str, k: int) -> None:
    """Run in a subprocess: SIGKILL right after shard k's manifest ("boundary") or while writing shard k ("mid")."""

    def work(chunk: list[int], index: int) -> list[dict]:
        if mode == "boundary" and index == k + 1:
            os.kill(os.getpid(), signal.SIGKILL)  # shard k's manifest was written just before this call
        rows = sample_work(chunk, index)
        return [*rows, {"bomb": Bomb()}] if mode == "mid" and index == k else rows

    run_sharded(out_dir, range(N), SIZE, work, fingerprint=FP, desc="killed", stats=draw_stats, progress=False)


def concatenated(out_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(shard_dir(out_dir).glob("*.jsonl")))


def run(out_dir: Path, calls: list[int], **kwargs) -> object:
    options = {"fingerprint": FP, "desc": "test", "stats": draw_stats, "progress": False, **kwargs}
    return run_sharded(out_dir, range(N), SIZE, recording(calls), **options)


@pytest.mark.parametrize(("mode", "k"), [("boundary", 3), ("mid", 6)])
def test_killed_then_resumed_is_byte_identical(tmp_path: Path, mode: str, k: int) -> None:
    whole_calls: list[int] = []
    whole_dir = tmp_path / "whole"
    whole = run(whole_dir, whole_calls)
    assert whole_calls == list(range(SHARDS)) and whole.rows_in == N and 0 < whole.rows_out < N

    killed = tmp_path / "killed"
    code = f"from tests.test_shards import killed_run; killed_run({str(killed)!r}, {mode!r}, {k})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    complete = k + 1 if mode == "boundary" else k
    assert sorted(shard_manifests(killed)) == list(range(complete))
    if mode == "mid":  # the killed write left a partial temp file, never renamed into place
        (partial,) = shard_dir(killed).glob(f".{k:05d}.jsonl.*.tmp")
        assert partial.stat().st_size > 0 and not (shard_dir(killed) / f"{k:05d}.jsonl").exists()

    resumed_calls: list[int] = []
    resumed = run(killed, resumed_calls)
    assert resumed_calls == list(range(complete, SHARDS))  # only the missing shards ran
    assert resumed.resumed == complete and resumed.computed == SHARDS - complete
    assert not list(shard_dir(killed).glob(".*"))  # the partial file is gone
    assert concatenated(killed) == concatenated(whole_dir)
    assert list(iter_rows(killed)) == list(iter_rows(whole_dir)) and count_rows(killed) == whole.rows_out
    assert resumed.moments == whole.moments  # merged in shard order from the manifests: the very same floats
    counts = resumed.to_dict()
    assert counts["resumed_shards"] == complete and counts["rows_out"] == whole.rows_out
    assert [s["rows_out"] for s in counts["per_shard"]] == [s.rows_out for s in whole.shards]
    assert whole.rows_per_second > 0 and resumed.rows_per_second > 0


def pool_pass(out_dir: Path, n: int, shard_size: int = 250) -> tuple[int, RunningMoments]:
    """Peak traced memory of a score-like stage over n items plus a z-score pass over its output."""

    def work(chunk: list[dict], index: int) -> list[dict]:
        rng = random.Random(shard_seed(0, index))
        return [{"id": x["id"], "score": rng.gauss(-2.0, 0.5) + len(x["text"]) / 100} for x in chunk]

    tracemalloc.start()
    items = ({"id": i, "text": f"response number {i} " * 3} for i in range(n))  # streamed, never a list
    summary = run_sharded(
        out_dir, items, shard_size, work, fingerprint="m", desc="memory", progress=False,
        stats=lambda rows: {"score": (r["score"] for r in rows)},
    )  # fmt: skip
    scores = summary.moments["score"]
    z = RunningMoments().update(scores.z(row["score"]) for row in iter_rows(out_dir))  # the filter's second pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert summary.rows_out == scores.count == z.count == n
    return peak, z


def test_memory_does_not_grow_with_the_pool(tmp_path: Path) -> None:
    pool_pass(tmp_path / "warmup", 300)  # first-use allocations (imports, caches) out of the comparison
    small, _ = pool_pass(tmp_path / "small", 2_000)
    large, z = pool_pass(tmp_path / "large", 20_000)
    print(f"peak traced memory: n=2,000 {small / 1e3:.0f} kB, n=20,000 {large / 1e3:.0f} kB")
    assert large < 1.5 * small and large < 1_000_000  # a few 250-row shards, not 20,000 rows
    assert abs(z.mean) < 1e-9 and abs(z.std - 1.0) < 1e-9  # the streamed z-scores are standardised


def test_running_moments_match_numpy_in_any_split() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(1e3, 2.5, 5_000)  # a large offset: a naive sum-of-squares would lose digits here
    mean, std = float(np.mean(values)), float(np.std(values))  # np.std: ddof=0, the population std
    assert std == pytest.approx(statistics.pstdev(values.tolist()), rel=1e-12)
    for _ in range(20):
        cuts = np.sort(rng.integers(0, len(values), size=rng.integers(0, 40)))  # repeated cuts give empty parts
        parts = [RunningMoments().update(p.tolist()) for p in np.split(values, cuts)]
        order = rng.permutation(len(parts)).tolist()
        while len(order) > 1:  # merge a random pair until one is left: any order, any tree
            a, b = sorted(rng.choice(len(order), size=2, replace=False).tolist())
            parts[order[a]].merge(parts[order[b]])
            order.pop(b)
        total = parts[order[0]]
        assert total.count == len(values)
        assert total.mean == pytest.approx(mean, rel=1e-9, abs=1e-9) and total.std == pytest.approx(std, rel=1e-9)

    from mainlib.mutual import zscore

    moments = RunningMoments().update(values.tolist())
    assert [moments.z(v) for v in values.tolist()] == pytest.approx(zscore(values.tolist()), rel=1e-9, abs=1e-9)
    assert RunningMoments().update([4.0] * 5).z(4.0) == 0.0 == zscore([4.0] * 5)[0]  # constant: zeros, as zscore
    assert np.isnan(RunningMoments().std) and RunningMoments().merge(RunningMoments()).count == 0


def test_shard_seed_is_fixed_and_distinct() -> None:
    assert shard_seed(0, 0) == 3426647180  # pinned: changing it would break resuming runs made by older code
    seeds = {shard_seed(s, i) for s in range(5) for i in range(2_000)}
    assert len(seeds) == 10_000 and all(0 <= s < 2**32 for s in seeds)


def test_other_fingerprint_or_shard_size_is_an_error_until_restart(tmp_path: Path) -> None:
    run(tmp_path, [])
    for options in ({"fingerprint": "other"}, {"shard_size": 7}):
        calls: list[int] = []
        with pytest.raises(ShardMismatchError, match="restart=True"):
            run_sharded(tmp_path, range(N), options.get("shard_size", SIZE), recording(calls),
                        fingerprint=options.get("fingerprint", FP), desc="x", progress=False)  # fmt: skip
        assert calls == []  # nothing computed, nothing overwritten
    calls = []
    summary = run(tmp_path, calls, fingerprint="other", restart=True)
    assert calls == list(range(SHARDS)) and summary.resumed == 0
    assert {m["fingerprint"] for m in shard_manifests(tmp_path).values()} == {"other"}


def test_damaged_shards_are_recomputed(tmp_path: Path) -> None:
    run(tmp_path, [])
    original = concatenated(tmp_path)
    folder = shard_dir(tmp_path)
    rows_2 = folder / "00002.jsonl"
    rows_2.write_bytes(rows_2.read_bytes().replace(b'"item": 2', b'"item": 9'))  # same size, other bytes
    (folder / "00005.jsonl").unlink()  # rows gone, manifest left
    (folder / "00008.json").unlink()  # killed between renaming the rows and writing the manifest
    calls: list[int] = []
    with pytest.warns(UserWarning, match="sha256") as caught:
        summary = run(tmp_path, calls)
    assert len(caught) == 2 and calls == [2, 5, 8] and summary.resumed == SHARDS - 3
    assert concatenated(tmp_path) == original


def test_input_changed_under_the_same_fingerprint_is_an_error(tmp_path: Path) -> None:
    run(tmp_path, [])
    for n in (N + 4, N - 23):  # grown: the last shard has more rows; shrunk: shards past the end
        with pytest.raises(ShardMismatchError, match="input"):
            run_sharded(tmp_path, range(n), SIZE, sample_work, fingerprint=FP, desc="x", progress=False)
    (shard_dir(tmp_path) / "00004.json").unlink()
    with pytest.raises(ValueError, match=r"shards \[4\] are missing"):
        next(iter_rows(tmp_path))


def test_counts_of_work_are_summed_over_shards_resumed_or_not(tmp_path: Path) -> None:
    def work(items: list[int], index: int):
        kept = [{"x": x} for x in items if x % 3]
        return kept, {"kept": len(kept), "dropped_multiple_of_3": len(items) - len(kept)}

    first = run_sharded(tmp_path, range(10), 4, work, fingerprint="f", desc="t", progress=False)
    assert first.counts == {"kept": 6, "dropped_multiple_of_3": 4}
    again = run_sharded(tmp_path, range(10), 4, work, fingerprint="f", desc="t", progress=False)
    assert again.resumed == 3 and again.counts == first.counts and again.to_dict()["counts"] == first.counts
