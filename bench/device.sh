#!/usr/bin/env bash
# Run benchmark suites on the offline GPU machine and keep the results and a log.
#
# Here, once:   ../shared/gpu/stage-wheels.sh liger-kernel==0.8.5     (writes .whl/, git-ignored, ~57 MB)
# There:        bash bench/device.sh sft memory        then        bash bench/device.sh generate score tdpo
#               (two calls of the device tool with carry [".whl"]: each stays well inside 10 minutes)
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
