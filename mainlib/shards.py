"""Sharded, resumable data stages: a stage streams its input in fixed-size shards and writes each one atomically.

Why: synthesis, scoring, rating and token weights over a Humpback-sized pool (500k responses) take hours; held in
memory and written at the end, a crash at 99% starts the stage again. Here a killed stage resumes at its first
missing shard, its output is byte-identical to an uninterrupted run's, and memory holds one shard, not the pool.

On disk, under a stage folder `out_dir`:

    shards/00000.jsonl   shard 0's rows, one JSON object a line (temp file + fsync + rename)
    shards/00000.json    shard 0's manifest, written after its rows: its presence means the shard is complete
    shards/00001.jsonl   ...

Resume rule: a shard whose manifest has this stage's fingerprint and shard size, and whose rows file still has the
recorded sha256, is skipped (its `work` is not called, its rows are not read). Every other shard is computed:
a shard without manifest (killed mid-shard), one whose rows file is missing or changed (recomputed, with a
warning), and all shards after them. A manifest of another fingerprint or shard size is a `ShardMismatchError`
unless `restart=True`, which discards every shard; the stage runner decides (e.g. move the folder aside first).

Seeding rule: `work(items, index)` must seed every generator it samples from with `shard_seed(seed, index)`
(`seed_all` for random/numpy/torch, or a `GenerationSettings` with `seed=shard_seed(...)`, since `generate`
reseeds per call). Shards are fixed by `shard_size`, so each shard's items, and the batches `work` forms from
them, are the same in a resumed run as in an uninterrupted one; hence the same samples.

Whole-pool statistics (the mean and std of `mutual.zscore`, the mean token weight) are reduced per shard into
`RunningMoments` stored in the shard's manifest, so a resumed run merges them without re-reading old shards,
and a filter applies them in a second streaming pass over `iter_rows`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from mainlib import distributed
from mainlib.results import TEMP_SUFFIX, write_json, write_jsonl

T = TypeVar("T")
Row = dict[str, Any]
Work = Callable[[list[T], int], "list[Row] | tuple[list[Row], dict[str, int]]"]
Stats = Callable[[list[Row]], dict[str, Iterable[float]]]

SHARDS_DIR = "shards"


class ShardMismatchError(ValueError):
    """Shards on disk were made by another configuration (fingerprint, shard size) or from other input."""


# ---- seeds ----------------------------------------------------------------------------------------------


def shard_seed(seed: int, index: int) -> int:
    """The seed of shard `index`: a hash of (seed, index), so it depends on nothing but the shard's position."""
    digest = hashlib.sha256(f"mainlib-shard:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")  # 32 bits: a valid seed for random, numpy and torch alike


def seed_all(seed: int) -> None:
    """Seed `random`, numpy and, when it is already imported (a model is in use), torch with `seed`."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)  # seeds the CUDA generators too


# ---- streaming moments ------------------------------------------------------------------------------------


@dataclass
class RunningMoments:
    """Count, mean and M2 (sum of squared deviations) of a stream; mergeable, so each shard reduces on its own."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: Iterable[float]) -> RunningMoments:
        """Add values one at a time (Welford), in O(1) memory."""
        for value in values:
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count  # the mean moves by δ/n
            self.m2 += delta * (value - self.mean)  # = δ²·(n−1)/n: never negative, no cancellation
        return self

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Add another part's moments (Chan et al.); merging in the same order gives the same floats."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        # mean = mean_a + δ·n_b/n; M2 = M2_a + M2_b + δ²·n_a·n_b/n (the spread between the two parts' means)
        self.mean += delta * other.count / n
        self.m2 += other.m2 + delta * delta * self.count * other.count / n
        self.count = n
        return self

    @property
    def variance(self) -> float:
        """Population variance M2/n (ddof 0), as `mutual.zscore` and `statistics.pvariance`; NaN when empty."""
        return self.m2 / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def z(self, value: float) -> float:
        """(value − mean) / std; 0 when the values are constant, as `mutual.zscore`."""
        return 0.0 if self.std == 0 else (value - self.mean) / self.std

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunningMoments:
        return cls(int(data["count"]), float(data["mean"]), float(data["m2"]))


def reduce_moments(stats: Stats, rows: list[Row]) -> dict[str, RunningMoments]:
    """`stats(rows)` names value streams (e.g. {"s_f": ...}); each becomes its RunningMoments."""
    return {name: RunningMoments().update(values) for name, values in stats(rows).items()}


# ---- summary ----------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    index: int
    rows_in: int
    rows_out: int
    seconds: float  # of `work` and the writes, when the shard was computed
    resumed: bool  # True: complete on disk, skipped in this call
    counts: dict[str, int] = field(default_factory=dict)  # what `work` counted (e.g. rows dropped, by reason)


@dataclass
class ShardSummary:
    """What `run_sharded` did: per-shard counts, totals, throughput and the merged whole-pool moments."""

    shards: list[ShardInfo]
    seconds: float  # wall time of this call
    moments: dict[str, RunningMoments] = field(default_factory=dict)

    @property
    def rows_in(self) -> int:
        return sum(s.rows_in for s in self.shards)

    @property
    def rows_out(self) -> int:
        return sum(s.rows_out for s in self.shards)

    @property
    def resumed(self) -> int:
        return sum(s.resumed for s in self.shards)

    @property
    def computed(self) -> int:
        return len(self.shards) - self.resumed

    @property
    def counts(self) -> dict[str, int]:
        """`work`'s counts summed over the shards."""
        total: dict[str, int] = {}
        for info in self.shards:
            for name, value in info.counts.items():
                total[name] = total.get(name, 0) + value
        return total

    @property
    def rows_per_second(self) -> float:
        """Input rows per second over the shards computed in this call (resumed shards cost ~nothing)."""
        done = [s for s in self.shards if not s.resumed]
        seconds = sum(s.seconds for s in done)
        return sum(s.rows_in for s in done) / seconds if seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """The stage manifest's counts."""
        return {
            "shards": len(self.shards),
            "resumed_shards": self.resumed,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "seconds": self.seconds,
            "rows_per_second": self.rows_per_second,
            "counts": self.counts,
            "moments": {k: m.to_dict() for k, m in self.moments.items()},
            "per_shard": [asdict(s) for s in self.shards],
        }


# ---- files ------------------------------------------------------------------------------------------------


def shard_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / SHARDS_DIR


def _rows_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.jsonl"


def _manifest_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.json"


def _indices(folder: Path) -> list[int]:
    """Indices of the shards with a manifest, in order (temp files start with '.' and end in .tmp)."""
    return sorted(int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit())


def shard_manifests(out_dir: str | Path) -> dict[int, dict[str, Any]]:
    """The manifests on disk, by shard index: small, so all of them fit in memory even for 500k rows."""
    folder = shard_dir(out_dir)
    return {i: json.loads(_manifest_path(folder, i).read_text(encoding="utf-8")) for i in _indices(folder)}


def file_sha256(path: Path) -> str | None:
    """sha256 of a file, read 64 KiB at a time; None when it does not exist."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            digest.update(chunk)
    return digest.hexdigest()


def iter_rows(out_dir: str | Path) -> Iterator[Row]:
    """All rows, in shard order, one at a time: a pool never has to fit in memory."""
    folder = shard_dir(out_dir)
    indices = _indices(folder)
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise ValueError(f"{folder}: shards {missing} are missing; the stage is unfinished, run it again")
    for index in indices:
        with _rows_path(folder, index).open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def count_rows(out_dir: str | Path) -> int:
    """Rows written, from the manifests alone (no shard is read)."""
    return sum(m["rows_out"] for m in shard_manifests(out_dir).values())


# ---- the runner -----------------------------------------------------------------------------------------


def _prepare(out_dir: Path, fingerprint: str, shard_size: int, restart: bool) -> dict[int, dict[str, Any]]:
    """Make the shard folder, drop a killed write's temp files, and check the manifests belong to this stage."""
    folder = shard_dir(out_dir)
    if restart and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for partial in folder.glob(f".*{TEMP_SUFFIX}"):
        partial.unlink()  # a shard (or manifest) whose write was killed: never renamed, so never counted
    manifests = shard_manifests(out_dir)
    found = {(m.get("fingerprint"), m.get("shard_size")) for m in manifests.values()}
    other = found - {(fingerprint, shard_size)}
    if other:
        was = ", ".join(f"fingerprint {fp} with shard_size {size}" for fp, size in sorted(other, key=str))
        raise ShardMismatchError(
            f"{folder} holds {len(manifests)} shards of another configuration ({was}; now fingerprint "
            f"{fingerprint} with shard_size {shard_size}). Pass restart=True to discard them and start over, "
            "or move the folder aside."
        )
    return manifests


def _complete(folder: Path, index: int, manifest: Row, rows_in: int) -> bool:
    """Whether shard `index` is on disk as its manifest says: rows file intact, made from as many input rows."""
    if file_sha256(_rows_path(folder, index)) != manifest["sha256"]:
        warnings.warn(f"{_rows_path(folder, index)} is missing or changed (sha256); recomputing it", stacklevel=4)
        return False
    if manifest["rows_in"] != rows_in:
        raise ShardMismatchError(
            f"shard {index} was made from {manifest['rows_in']} input rows, the input now gives {rows_in}: "
            "the input changed but the fingerprint did not (it must cover the stage's input)"
        )
    return True


def _compute(folder: Path, index: int, chunk: list[T], work: Work, meta: Row, stats: Stats | None) -> Row:
    """Run `work` on one shard, write its rows, then (last) its manifest."""
    start = time.perf_counter()
    output = work(chunk, index)
    rows, counts = output if isinstance(output, tuple) else (output, {})
    moments = reduce_moments(stats, rows) if stats else {}
    write_jsonl(_rows_path(folder, index), rows)
    manifest = {
        "index": index,
        "rows_in": len(chunk),
        "rows_out": len(rows),
        "seconds": time.perf_counter() - start,
        "sha256": file_sha256(_rows_path(folder, index)),
        "process": distributed.rank(),  # which process of a launch computed it
        **meta,
        "counts": counts,
        "moments": {name: m.to_dict() for name, m in moments.items()},
    }
    write_json(_manifest_path(folder, index), manifest)  # its presence means the shard is complete
    return manifest


def _owned_rows(total: int | None, shard_size: int) -> int | None:
    """How many of `total` input rows fall in this process's shards (shard i belongs to process i mod N)."""
    if total is None:
        return None
    n, me = distributed.world_size(), distributed.rank()
    return sum(min(shard_size, total - i) for i in range(me * shard_size, total, n * shard_size))


def run_sharded(
    out_dir: str | Path,
    items: Iterable[T],
    shard_size: int,
    work: Work,
    *,
    fingerprint: str,
    desc: str,
    stats: Stats | None = None,
    restart: bool = False,
    progress: bool = True,
) -> ShardSummary:
    """Apply `work(shard_items, shard_index)` to `items` in shards of `shard_size`, resuming complete shards.

    `work` returns the shard's output rows (JSON-able dicts, any number), or (rows, counts) where counts are
    integers the summary sums over shards (e.g. rows dropped by reason); it must seed from
    `shard_seed(seed, index)`. `stats(rows)` names value streams whose whole-pool moments the summary holds.
    `fingerprint` must cover the stage's input, config and code; see the module docstring for the rules.

    Under `accelerate launch` every process calls this with the same `items`: shard i is computed by process
    i mod N, then all of them wait for each other and return the same summary, read from the manifests on
    disk in shard order (so the moments are the same floats as in one process).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1; got {shard_size}")
    start, out_dir = time.perf_counter(), Path(out_dir)
    folder = shard_dir(out_dir)
    manifests = distributed.on_main(lambda: _prepare(out_dir, fingerprint, shard_size, restart))
    meta = {"fingerprint": fingerprint, "shard_size": shard_size}
    n, me, it, computed, indices = distributed.world_size(), distributed.rank(), iter(items), [], []
    total = _owned_rows(len(items) if isinstance(items, Sized) else None, shard_size)
    where = f" (process {me} of {n})" if n > 1 else ""
    with tqdm(total=total, desc=desc + where, unit="row", disable=not progress) as bar:
        for index in itertools.count():
            chunk = list(itertools.islice(it, shard_size))  # one shard of input at a time
            if not chunk:
                break
            indices.append(index)
            if index % n != me:
                continue  # another process's shard
            manifest = manifests.get(index)
            if manifest is None or not _complete(folder, index, manifest, len(chunk)):
                _compute(folder, index, chunk, work, meta, stats)
                computed.append(index)
            bar.update(len(chunk))
            bar.set_postfix(shard=index, computed=len(computed), refresh=False)
    computed_now = {i for part in distributed.gather(computed) for i in part}  # also: every process is done
    return _summary(folder, indices, computed_now, time.perf_counter() - start)


def _summary(folder: Path, indices: list[int], computed: set[int], seconds: float) -> ShardSummary:
    """The summary of shards `indices`, from their manifests; a shard not in `computed` was resumed."""
    manifests = shard_manifests(folder.parent)
    if extra := sorted(set(manifests) - set(indices)):  # shards past the end: the input shrank, same fingerprint
        raise ShardMismatchError(f"the input ended after {len(indices)} shards but {folder} also holds shards {extra}")
    infos, moments = [], {}
    for index in indices:
        manifest = manifests[index]
        for name, part in manifest["moments"].items():  # in shard order: the same floats, resumed or not
            moments.setdefault(name, RunningMoments()).merge(RunningMoments.from_dict(part))
        rows_in, rows_out, seconds_used = manifest["rows_in"], manifest["rows_out"], manifest["seconds"]
        counts = manifest.get("counts", {})
        infos.append(ShardInfo(index, rows_in, rows_out, seconds_used, index not in computed, counts))
    return ShardSummary(infos, seconds, moments)
