#!/usr/bin/env bash
# Run benchmark suites on the offline GPU machine and keep the results and a log.
#
# Here, once:   ../shared/gpu/stage-wheels.sh liger-kernel==0.8.5     (writes .whl/, git-ignored, ~57 MB)
# There, two device-tool calls (carry [".whl"]), each meant to stay inside 10 minutes (not yet timed on a GPU:
# none has been lent; if one runs over, split it by suite or shape, e.g. `sft/llama-2-7b`):
#               bash bench/device.sh sft memory --trace
#               bash bench/device.sh generate score tdpo --trace
# (--trace: one more call of each path under torch.profiler: its heaviest operators and how busy the GPU
# was, the "where the time goes" for any target that is not met)
# Results go to results/bench/<gpu>.json and .png in the working copy (kept between calls while the
# machine is warm; each call updates only its suites) and are copied to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target /tmp/site .whl/*
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1
gpu=$(python3 -m bench.gpu_name)
mkdir -p results/bench
set -o pipefail
python3 -m bench "$@" --out "results/bench/$gpu.json" 2>&1 | tee -a "results/bench/$gpu.log"
if [ -n "${OUT:-}" ]; then
  cp "results/bench/$gpu.json" "results/bench/$gpu.png" "results/bench/$gpu.log" "$OUT"/
fi
