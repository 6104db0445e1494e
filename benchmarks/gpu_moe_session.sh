#!/usr/bin/env bash
# One GPU call for the MoE block work: carried wheels (liger-kernel, tokamax and the
# dependencies the GPU image lacks, under .whl/), the GPU tests of the block and the
# transformers integration, the block benchmark (with Liger, the torch._grouped_mm block and
# pallas_gg), then the single-GEMM benchmark with tokamax in the same process.
# Usage on the GPU machine: bash benchmarks/gpu_moe_session.sh [benchmark impls]
set -u
OUT=${OUT:-/tmp/gg_out}
mkdir -p "$OUT/bench" "$OUT/tc"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
# .whl/stub: benchmark-only stand-in for xprof, which tokamax imports but our timing never uses
export PYTHONPATH=.:/tmp/site:.whl/stub PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export GG_CACHE_DIR="$OUT/tc"
cp benchmarks/tuned/tuned_*.json "$GG_CACHE_DIR"/ 2>/dev/null
LOG="$OUT/run.log"
{
  date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton, jax, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, 'transformers', transformers.__version__)"
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:warnings \
    ${GG_TESTS:-tests/test_hf_experts.py tests/test_triton_moe.py tests/test_pallas_moe.py} \
    ${GG_K:+-k "$GG_K"} 2>&1 | grep -v "^  " | tail -25
  timeout 330 python3 -m benchmarks.moe_block --jax --profile --json "$OUT/moe_block.json"
  if [ -n "${1:-}" ]; then
    timeout 300 python3 -m benchmarks --out "$OUT/bench" --impls "$1" --tag "${GG_TAG:-tokamax}" 2>&1 | tail -40
  fi
  date -u
} 2>&1 | tee "$LOG"
