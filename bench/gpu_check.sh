#!/usr/bin/env bash
# The device check, one command (<= 8 min on one H100): random-init ViT-B/16 x2 + BLIP-base at 224 px over
# 4,000 generated samples, stage 1 (`mcad cache`) then stage 2 (`mcad distill`) on CUDA in bf16, timed with
# nvidia-smi polled alongside -> bench/results/gpu.{json,md}. Extra arguments go to bench/gpu_check.py
# (e.g. --samples 2000, --device cuda:1; --tiny --device cpu is the CPU check the tests run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -d .whl ] && [ "$PY" = python3 ]; then  # the device machine: the wheels bench/gpu_wheels.sh fetched, carried
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mcad-site .whl/*.whl
  export PYTHONPATH=/tmp/mcad-site${PYTHONPATH:+:$PYTHONPATH}
fi
exec timeout 480 "$PY" -m bench.gpu_check "$@"
