"""A large unlabeled pool through MAIN's sharded stages on the tiny test model: is memory flat, how fast?

    MAINLIB_DATA_DIR=../shared/data python scripts/pool_scale.py            # 20,000 responses
    python scripts/pool_scale.py --pool 2000 --out /tmp/scale               # a quick look

The pool is real text: the lines of GSM8K's training solutions (`MAINLIB_DATA_DIR`), as Humpback's pool is
segments of web pages. The model is the test suite's tiny random Llama, trained on 16 seed pairs by the
`init_sft` stage, so what is measured is the pipeline (streaming, shards, dedup, bookkeeping), not a model.
MAIN runs up to `score` (synthesize and score are sharded) while a thread samples the process's resident
memory every half second. Writes `<out>/pool_<n>.json` (RSS samples, per-stage seconds, rows/s, counts) and
`<out>/pool_<n>.png` (RSS against rows done).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mainlib import data, shards  # noqa: E402
from mainlib.config import MainConfig, build  # noqa: E402
from mainlib.paths import data_dir  # noqa: E402
from mainlib.pipeline import run_main  # noqa: E402
from mainlib.results import write_json  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402


def rss_mib() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Sampler(threading.Thread):
    """RSS and rows finished (shard manifests on disk) every `every` seconds, until stopped."""

    def __init__(self, run_dir: Path, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.every, self.samples, self.stop = run_dir, every, [], threading.Event()
        self.start_time = time.perf_counter()

    def rows_done(self) -> dict[str, int]:
        done = {}
        for stage in ("synthesize", "score"):
            manifests = shards.shard_manifests(self.run_dir / stage) if (self.run_dir / stage).is_dir() else {}
            done[stage] = sum(m["rows_in"] for m in manifests.values())
        return done

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append({"t": time.perf_counter() - self.start_time, "rss_mib": rss_mib(), **self.rows_done()})
            self.stop.wait(self.every)


def write_pool(path: Path, n: int) -> int:
    """`n` distinct response segments: the lines of GSM8K training solutions (the `####` answer lines dropped)."""
    seen: set[str] = set()
    with open(path, "w", encoding="utf-8") as out:
        for record in data.load_jsonl(data_dir() / "gsm8k_train.jsonl"):
            for line in record["answer"].splitlines():
                line = line.strip()
                if len(line) > 20 and not line.startswith("####") and line not in seen:
                    seen.add(line)
                    out.write(json.dumps({"response": line}) + "\n")
                    if len(seen) == n:
                        return n
    return len(seen)


def figure(samples: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s["t"] for s in samples], [s["rss_mib"] for s in samples], color="black", label="resident memory")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    twin = ax.twinx()
    for stage, colour in (("synthesize", "tab:blue"), ("score", "tab:orange")):
        twin.plot([s["t"] for s in samples], [s[stage] for s in samples], color=colour, label=f"{stage}: rows done")
    twin.set_ylabel("rows done")
    fig.legend(loc="upper left", fontsize=8)
    ax.set_title(out.stem.replace("_", " "))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20_000, help="pool responses")
    parser.add_argument("--shard-size", type=int, default=1000, help="rows per shard")
    parser.add_argument("--out", default=str(REPO / "results" / "scale"), help="folder of the JSON and figure")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pool_scale_"))
    pool_file = work / "pool.jsonl"
    n = write_pool(pool_file, args.pool)
    config = build(
        MainConfig,
        "quickstart",
        model=str(build_tiny_model(work / "tiny")),
        pool_data=str(pool_file),
        runs_dir=str(work / "runs"),
        run_name="scale",
        n_seed=16,
        n_pool=None,
        max_length=256,
        learning_rate=2e-2,
        epochs=4.0,
        rounds=0,
        synthesis_max_new_tokens=32,
        synthesis_max_batch_size=128,
        shard_size=args.shard_size,
    )
    sampler = Sampler(work / "runs" / "scale")
    sampler.start()
    state = run_main(config, until="score")
    sampler.stop.set()
    sampler.join()
    stages = {name: {"seconds": m["seconds"], "counts": m["counts"]} for name, m in state.stages.items()}
    rss = [s["rss_mib"] for s in sampler.samples]
    per_stage = {}
    for stage in ("synthesize", "score"):
        during = [s["rss_mib"] for s in sampler.samples if 0 < s[stage] < max(x[stage] for x in sampler.samples)]
        rows = stages[stage]["counts"].get("pool", stages[stage]["counts"].get("scored"))
        per_stage[stage] = {
            "rows": rows,
            "rows_per_second": rows / stages[stage]["seconds"],
            "rss_mib_first_shard_done": during[0] if during else None,
            "rss_mib_max_while_running": max(during) if during else None,
        }
    record = {
        "pool": n,
        "shard_size": args.shard_size,
        "model": "tests/tiny_model.py (random tiny Llama, 16 seed pairs, init_sft only)",
        "cpu_threads": os.cpu_count(),
        "peak_rss_mib": max(rss),
        "per_stage": per_stage,
        "stages": stages,
        "samples": sampler.samples,
    }
    out = Path(args.out)
    write_json(out / f"pool_{n}.json", record)
    figure(sampler.samples, out / f"pool_{n}.png")
    print(json.dumps({k: v for k, v in record.items() if k not in ("samples", "stages")}, indent=1))


if __name__ == "__main__":
    main()
