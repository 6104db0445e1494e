#!/usr/bin/env bash
# One GPU call: carried wheels (.whl/), the GPU tests named by GG_TESTS (pytest -m gpu),
# the expert-block benchmark (Liger and the torch._grouped_mm block in the same process;
# MOE_ARGS adds e.g. --jax --profile), then the Mosaic GPU probe with the tiles of
# MOSAIC_SWEEP, the persistent-forward probe on PERSISTENT_SHAPES, then
# `python -m benchmarks --impls $BENCH_IMPLS`. Every step has its own time
# limit; results and logs land in $OUT.
set -u -o pipefail
OUT=${OUT:-/tmp/gg_out}
mkdir -p "$OUT/tc"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=.:/tmp/site:.whl/stub PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export GG_CACHE_DIR="$OUT/tc"   # new tunings; the shipped ones are read from gg_spec/tuned/
{
  date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  if [ -n "${GG_TESTS:-}" ]; then
    timeout "${TEST_LIMIT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider \
      -p no:warnings $GG_TESTS ${GG_K:+-k "$GG_K"} 2>&1 | grep -v "^  " | tail -30
  fi
  if [ -z "${NO_MOE:-}" ]; then
    timeout "${MOE_LIMIT:-240}" python3 -m benchmarks.moe_block ${MOE_ARGS:-} \
      --json "$OUT/moe_block.json"
  fi
  if [ -n "${MOSAIC_SWEEP+x}" ]; then
    timeout "${MOSAIC_LIMIT:-150}" python3 -m benchmarks.mosaic_probe \
      --shape "${MOSAIC_SHAPES:-qwen3_w1}" --sweep "$MOSAIC_SWEEP" --json "$OUT/mosaic_probe.json"
  fi
  if [ -n "${PERSISTENT_SHAPES:-}" ]; then
    timeout "${PERSISTENT_LIMIT:-200}" python3 -m benchmarks.persistent_probe \
      --shapes "$PERSISTENT_SHAPES" --op "${PERSISTENT_OP:-forward}" \
      --json "$OUT/persistent_probe_${PERSISTENT_OP:-forward}.json"
  fi
  if [ -n "${BENCH_IMPLS:-}" ]; then
    timeout "${BENCH_LIMIT:-330}" python3 -m benchmarks --out "$OUT" --impls "$BENCH_IMPLS" \
      --tag "${BENCH_TAG:-session}" 2>&1 | tail -45
  fi
  date -u
} 2>&1 | tee "$OUT/run.log"
