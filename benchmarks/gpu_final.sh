#!/usr/bin/env bash
# A short GPU call: the expert block's GPU test and benchmark (Liger, torch block; no JAX,
# no profile), then the Mosaic GPU lowering probe. Results in $OUT.
set -u
OUT=${OUT:-/tmp/gg_out}; mkdir -p "$OUT/tc"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/liger*.whl
fi
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false GG_CACHE_DIR="$OUT/tc"
cp benchmarks/tuned/tuned_*.json "$GG_CACHE_DIR"/
{
  nvidia-smi --query-gpu=name --format=csv,noheader
  timeout 60 python3 -m pytest -q -m gpu -p no:warnings tests/test_triton_moe.py 2>&1 | tail -3
  timeout 120 python3 -m benchmarks.moe_block --json "$OUT/moe_block.json"
  timeout 90 python3 -m benchmarks.mosaic_probe --json "$OUT/mosaic_probe.json"
} 2>&1 | tee "$OUT/run.log"
