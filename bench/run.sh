#!/usr/bin/env bash
# Merge benchmark: soce vs mergekit 0.1.5 on synthetic Llama-shaped bf16 checkpoints (see bench/merge_bench.py).
# Usage: bash bench/run.sh [--repeats 3] [--strict] [--json results.json] ...
# mergekit lives in a bench-only venv (bench/.venv), never in soce's dependencies. torch is pinned so that pip
# takes the machine's local CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SOCE_PYTHON:-.venv/bin/python}
if [ ! -x bench/.venv/bin/mergekit-yaml ]; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install --quiet "torch==${BENCH_TORCH:-2.13.0}" mergekit==0.1.5
fi
exec "$PY" bench/merge_bench.py "$@"
