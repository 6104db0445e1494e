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
    p.add_argument("--shape", default="qwen3_w1")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--json", default=None)
    p.add_argument("--sweep", default="",
                   help="extra Mosaic tiles to time on the plain forward and dX, "
                        "comma-separated BMxBNxBKxSTEPS (e.g. 128x128x64x4,64x256x64x4)")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import pallas_gg
    from benchmarks.problems import make_problem
    from benchmarks.timing import time_jax
    from gg_spec import rel_error
    prob = make_problem(args.shape, args.tokens)
    s = prob.shape
    m = prob.m
    sizes = np.full(s.num_experts, m // s.num_experts, np.int32)
    sizes[: m - sizes.sum()] += 1
    key = jax.random.key(0)
    kx, kw, kd = jax.random.split(key, 3)
    x = jax.random.normal(kx, (m, s.k), jnp.bfloat16)
    w = (jax.random.normal(kw, (s.num_experts, s.n, s.k), jnp.float32) * s.k**-0.5).astype(
        jnp.bfloat16)
    dy = jax.random.normal(kd, (m, s.n), jnp.bfloat16)
    m_sizes = jnp.asarray(sizes)
    flops = 2.0 * m * s.n * s.k
    rows = []
    for op, fn_args in (("fwd", (x,)), ("dX", (dy,))):
        for backend in ("triton", "mosaic"):
            def call(a, w, backend=backend, op=op):
                if op == "fwd":
                    return pallas_gg.grouped_gemm_forward(a, w, m_sizes, None, 1,
                                                          backend=backend)
                return pallas_gg.grouped_gemm_dX(a, w, m_sizes, None, 1, backend=backend)
            fn = jax.jit(call)
            try:
                out = fn(*fn_args, w)
                ms = time_jax(fn, *fn_args, w)
                rows.append({"op": op, "backend": backend, "ms": ms,
                             "tflops": flops / (ms * 1e-3) / 1e12, "out": out})
            except Exception as e:  # noqa: BLE001
                rows.append({"op": op, "backend": backend, "error": f"{type(e).__name__}: "
                                                                   f"{str(e)[:400]}"})
    rows += _sweep(args.sweep, x, w, dy, m_sizes, flops, time_jax)
    ok = True
    for op in ("fwd", "dX"):
        r = {row["backend"]: row for row in rows if row["op"] == op and "tile" not in row}
        if "out" in r["triton"] and "out" in r["mosaic"]:
            err = rel_error(np.asarray(r["mosaic"]["out"], np.float32),
                            np.asarray(r["triton"]["out"], np.float32))
            r["mosaic"]["rel_error_vs_triton"] = err
            ok &= err < 2e-2
        else:
            ok = False
    for row in rows:
        row.pop("out", None)
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "tokens": args.tokens,
                       "device": jax.devices()[0].device_kind, "rows": rows}, f, indent=1)
    return 0 if ok else 1


def _sweep(spec, x, w, dy, m_sizes, flops, time_jax):
    """Time grouped_matmul itself with each tile of `spec` (forward: transpose_rhs; dX: the
    weights read [N, K])."""
    import jax

    from pallas_gg.mosaic_lowering.matmul import MosaicConfig, grouped_matmul
    rows = []
    for item in filter(None, spec.split(",")):
        bm, bn, bk, steps = (int(v) for v in item.split("x"))
        cfg = MosaicConfig(bm, bn, bk, steps)
        for op, lhs, transpose in (("fwd", x, True), ("dX", dy, False)):
            fn = jax.jit(lambda a, b, t=transpose: grouped_matmul(a, b, m_sizes,
                                                                  transpose_rhs=t, config=cfg))
            row = {"op": op, "backend": "mosaic", "tile": item}
            try:
                fn(lhs, w).block_until_ready()
                ms = time_jax(fn, lhs, w)
                row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
