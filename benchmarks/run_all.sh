#!/usr/bin/env bash
# Every figure of docs/performance.md in one run, one after the other (nothing else running):
#   bash benchmarks/run_all.sh      -> benchmarks/results/*.txt (about 30 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
run() { local name=$1; shift; echo "== $name: $*"; python3 -m uv run python "$@" 2>&1 \
  | grep -vE '^(I0000|W0000|E0000|WARNING: All log|To enable the following)' | tee "benchmarks/results/$name.txt"; }
run codes benchmarks/codes.py --epochs 2
run clusterers benchmarks/clusterers.py --epochs 2
run trial benchmarks/trial.py --epochs 1 --gmm-impl fast
run ray_overhead benchmarks/ray_overhead.py
run shared_training benchmarks/shared_training.py --subset 1000
