"""python -m benchmarks.mosaic_probe: pallas_gg's Mosaic GPU lowering (work in progress) on a
GPU: compile, agreement with the Triton lowering, and CUPTI kernel time of both, for the
plain forward and dX at one shape (default qwen3_w1, T = 8192, bf16, balanced routing)."""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mosaic_probe")
    p.add_argument("--shape", default="qwen3_w1", help="comma-separated shapes")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", default="",
                   help="extra Mosaic tiles to time on the plain forward and dX, "
                        "comma-separated BMxBNxBKxSTEPS[wWGS] (e.g. 128x128x64x6, "
                        "128x256x64x3w2: two compute warpgroups; a g<N> suffix sets the "
                        "visit grouping, 128x256x64x3w2g1: row-major)")
    args = p.parse_args(argv)
    import jax

    rows, ok = [], True
    for shape in args.shape.split(","):
        shape_rows, shape_ok = _probe_shape(shape, args.tokens, args.sweep)
        rows += shape_rows
        ok &= shape_ok
        if args.json:  # after each shape: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"shapes": args.shape, "tokens": args.tokens,
                           "device": jax.devices()[0].device_kind, "rows": rows}, f,
                          indent=1)
    return 0 if ok else 1


def _probe_shape(shape, tokens, sweep):
    """Forward, dX and dW on both lowerings (default tiles; balanced routing), the sweep's
    Mosaic tiles on forward and dX; every Mosaic output compared with the Triton one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pallas_gg
    from benchmarks.problems import make_problem
    from benchmarks.timing import time_jax
    from gg_spec import rel_error
    prob = make_problem(shape, tokens)
    s = prob.shape
    m = prob.m
    sizes = np.full(s.num_experts, m // s.num_experts, np.int32)
    sizes[: m - sizes.sum()] += 1
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, s.k), jnp.bfloat16)
    w = (jax.random.normal(kw, (s.num_experts, s.n, s.k), jnp.float32) * s.k**-0.5).astype(
        jnp.bfloat16)
    dy = jax.random.normal(kd, (m, s.n), jnp.bfloat16)
    m_sizes = jnp.asarray(sizes)
    flops = 2.0 * m * s.n * s.k
    ops = {"fwd": (pallas_gg.grouped_gemm_forward, x, w),
           "dX": (pallas_gg.grouped_gemm_dX, dy, w),
           "dW": (pallas_gg.grouped_gemm_dW, x, dy)}
    rows, ref = [], {}

    def timed(row, fn, *fn_args, op):
        try:
            out = fn(*fn_args)
            row.update(ms=time_jax(fn, *fn_args))
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            if op in ref:
                row["rel_error_vs_triton"] = rel_error(np.asarray(out, np.float32), ref[op])
            else:
                ref[op] = np.asarray(out, np.float32)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(row)

    for op, (public, a, b) in ops.items():
        for backend in ("triton", "mosaic"):
            fn = jax.jit(lambda a, b, public=public, backend=backend: public(
                a, b, m_sizes, None, 1, backend=backend))
            timed({"shape": shape, "op": op, "backend": backend}, fn, a, b, op=op)
    from pallas_gg.mosaic_lowering.matmul import MosaicConfig, grouped_matmul
    for item in filter(None, sweep.split(",")):
        tile_wgs, _, group = item.partition("g")
        tile, _, wgs = tile_wgs.partition("w")
        bm, bn, bk, steps = (int(v) for v in tile.split("x"))
        cfg = MosaicConfig(bm, bn, bk, steps, compute_wgs=int(wgs or 1),
                           group_m=int(group or MosaicConfig.group_m))
        for op, lhs, transpose in (("fwd", x, True), ("dX", dy, False)):
            fn = jax.jit(lambda a, b, t=transpose: grouped_matmul(a, b, m_sizes,
                                                                  transpose_rhs=t, config=cfg))
            timed({"shape": shape, "op": op, "backend": "mosaic", "tile": item}, fn, lhs, w,
                  op=op)
    # the default-tile rows must run and agree; a sweep tile may be refused (whole TMA
    # blocks, layouts) and is recorded, not failed
    defaults = [r for r in rows if "tile" not in r]
    ok = (all("error" not in r for r in defaults)
          and all(r.get("rel_error_vs_triton", 0) < 2e-2 for r in rows))
    return rows, ok


if __name__ == "__main__":
    sys.exit(main())
