#!/usr/bin/env bash
# One GPU session: GPU tests, then the benchmarks; everything lands in $OUT.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh [pytest -k expr] [benchmark args...]
set -u
OUT=${OUT:-/tmp/gg_out}
mkdir -p "$OUT"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export GG_CACHE_DIR="$OUT/tuning_cache"
# The configs tuned in earlier sessions ship in the package (gg_spec/tuned/, read by the
# lookup; keys name the card, so another card tunes afresh); what this session tunes comes
# back in $OUT/tuning_cache.
mkdir -p "$GG_CACHE_DIR"
TESTS=${GG_TESTS:-tests}
KEXPR=${GG_K:-}
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, triton, jax; print('torch', torch.__version__, 'triton', triton.__version__, 'jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
if [ "${GG_SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest $TESTS -m gpu -q --maxfail=5 -p no:cacheprovider ${KEXPR:+-k "$KEXPR"} \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "${GG_SKIP_BENCH:-0}" != 1 ]; then
  python3 -m benchmarks --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
ls -la "$OUT" "$OUT/tuning_cache" 2>/dev/null
