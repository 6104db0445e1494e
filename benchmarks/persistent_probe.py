"""Probe: tile configs of the persistent forward kernel (triton_gg/kernels/forward.py)
against the public function with its tuned config and torch._grouped_mm, same process,
same inputs (random routing), CUDA-event medians with warm L2 (benchmarks/timing.py).
(Session 4's first run of this probe compared the persistent kernel, then in a file of its
own, with the one-tile-per-program kernel it replaced; benchmarks/NOTES.md step 13.)

    python -m benchmarks.persistent_probe --shapes qwen3_w1,qwen3_w2 --json out.json

Each variant's output is compared with the public function's (max relative error
printed); a variant that fails to compile is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from benchmarks.problems import make_problem
from benchmarks.timing import time_torch, time_torch_interleaved
from benchmarks.torch_impls import TorchInputs
from gg_spec import DWConfig, ForwardConfig

# (name, config, programs per SM)
_T = dict(tma_load_w=True, tma_load_x=True)
VARIANTS = [
    ("p128x256_g1", ForwardConfig(128, 256, 64, 8, 3, 1, **_T), 1),
    ("p128x256_g8", ForwardConfig(128, 256, 64, 8, 3, 8, **_T), 1),
    ("p128x256_g8_ws", ForwardConfig(128, 256, 64, 8, 3, 8, **_T, warp_specialize=True), 1),
    ("p128x128_g8_s4", ForwardConfig(128, 128, 64, 8, 4, 8, **_T), 1),
    ("p128x128_g8_w4x2", ForwardConfig(128, 128, 64, 4, 3, 8, **_T), 2),
]


def _fusions(first_gemm: bool):
    """(name, permute_x, permute_y, fuse_mul) beyond the plain forward."""
    return [("permute_x", True, False, False)] if first_gemm else [
        ("permute_y_mul", False, True, True)]


def run_shape(name: str, tokens: int, rows: list):
    import triton_gg
    import gg_spec
    from triton_gg.kernels.forward import launch_forward
    gg_spec.set_value_checks(False)  # no host read between timed calls

    problem = make_problem(name, tokens)
    inp = TorchInputs(problem)
    flops = problem.flops
    routing = (inp.m_sizes, inp.gather, inp.topk)
    m, n = problem.m, problem.shape.n

    def record(impl, variant, ms, err=None):
        tf = flops / ms / 1e9
        rows.append(dict(shape=name, tokens=tokens, impl=impl, variant=variant, ms=ms,
                         tflops=tf, rel_err=err))
        print(f"{name:10s} {impl:22s} {variant:22s} {ms:8.4f} ms {tf:7.1f} TF/s"
              + (f"  err {err:.2e}" if err is not None else ""), flush=True)

    w_t = inp.w.transpose(1, 2)
    record("torch_grouped_mm", "-", time_torch(
        lambda: torch._grouped_mm(inp.x, w_t, offs=inp.offs)))
    for fusion, px, py, mul in [("plain", False, False, False)] + _fusions(
            problem.shape.is_first_gemm):
        x = inp.x_tokens if px else inp.x
        kw = dict(permute_x=px, permute_y=py, fuse_mul_post=mul)
        ref = triton_gg.grouped_gemm_forward(x, inp.w, *routing, autotune=True,
                                             topk_weights=inp.topk_weights if mul else None,
                                             **kw)
        record(f"triton_gg_{fusion}", "tuned", time_torch(
            lambda: triton_gg.grouped_gemm_forward(
                x, inp.w, *routing, autotune=True,
                topk_weights=inp.topk_weights if mul else None, **kw)))
        scale = ref.float().abs().max().item()
        for vname, config, per_sm in VARIANTS:
            if px:
                config = config.replace(tma_load_x=False)
            y = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
            programs = per_sm * torch.cuda.get_device_properties(0).multi_processor_count

            def call():
                launch_forward(
                    x, inp.w, inp.m_sizes, inp.gather, inp.topk_weights, y, y, topk=inp.topk,
                    store_unweighted=False, config=config, programs=programs, **kw)
            try:
                call()
                torch.cuda.synchronize()
            except Exception as exc:  # a variant this compiler cannot build
                print(f"{name} {fusion} {vname}: failed: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:160]}", flush=True)
                continue
            err = ((y.float() - ref.float()).abs().max().item() / scale) if scale else 0.0
            record(f"persistent_{fusion}", vname, time_torch(call), err)


DW_VARIANTS = [  # (name, config): the tuned config is timed too
    ("64x128x128_w8s3", DWConfig(64, 128, 128, 8, 3)),
    ("64x128x128_w4s3_x2", DWConfig(64, 128, 128, 4, 3)),
    ("64x256x128_w8s3", DWConfig(64, 256, 128, 8, 3)),
    ("128x128x128_w8s3", DWConfig(128, 128, 128, 8, 3)),
]


def run_dw(name: str, tokens: int, rows: list):
    """dW: the persistent grid against one tile per program (the same kernel launched with
    as many programs as output tiles), for the tuned config and a few others, timed in
    interleaved rounds."""
    import triton

    import gg_spec
    import triton_gg
    from triton_gg.kernels.dw import launch_dw
    gg_spec.set_value_checks(False)
    problem = make_problem(name, tokens)
    inp = TorchInputs(problem)
    s = problem.shape
    ref = triton_gg.grouped_gemm_dW(inp.x, inp.dy, inp.m_sizes, inp.gather, inp.topk,
                                    autotune=True)
    dims = SimpleNamespace(num_experts=s.num_experts, n=s.n, k=s.k, m=problem.m)
    tuned = triton_gg.autotune.cached(triton_gg.autotune.key_for(
        "dW", dims, inp.x.dtype, inp.x.device)) or gg_spec.default_config("dW")
    fns = {}
    for vname, config in [("tuned", tuned)] + DW_VARIANTS:
        tiles = s.num_experts * triton.cdiv(s.n, config.block_n) * triton.cdiv(
            s.k, config.block_k)
        for grid, programs in (("persistent", None), ("one_tile", tiles)):
            out = torch.empty_like(inp.w)
            fns[(vname, grid)] = (lambda out=out, config=config, programs=programs: launch_dw(
                inp.x, inp.dy, inp.m_sizes, inp.gather, out, topk=inp.topk, permute_x=False,
                permute_y=False, config=config, programs=programs), out)
    times = time_torch_interleaved({k: f for k, (f, _) in fns.items()})
    scale = ref.float().abs().max().item()
    for (vname, grid), (_, out) in fns.items():
        ms = times[(vname, grid)]
        if isinstance(ms, Exception):
            print(f"{name} dW {vname} {grid}: failed: {str(ms).splitlines()[0][:160]}")
            continue
        err = (out.float() - ref.float()).abs().max().item() / scale
        tf = problem.flops / ms / 1e9
        rows.append(dict(shape=name, tokens=tokens, impl=f"dW_{grid}", variant=vname, ms=ms,
                         tflops=tf, rel_err=err))
        print(f"{name:10s} dW {grid:10s} {vname:20s} {ms:8.4f} ms {tf:7.1f} TF/s err {err:.1e}",
              flush=True)


def run_swiglu(name: str, tokens: int, rows: list):
    """The block's first GEMM forward (permute_x, SiLU-gated) as the block runs it (the
    persistent forward writing H, then one silu-mul pass) against the GEMM alone: the cost
    of the gating pass. (Session 4 also timed the former fused kernel here, SiLU-gating in
    a one-tile-per-program GEMM's epilogue: benchmarks/NOTES.md step 13.)"""
    import gg_spec
    import triton_gg
    from triton_gg.kernels.forward import launch_forward
    from triton_gg.kernels.silu_mul import launch_silu_mul
    gg_spec.set_value_checks(False)
    problem = make_problem(name, tokens)
    inp = TorchInputs(problem)
    s = problem.shape
    m, inter = problem.m, s.n // 2
    dims = SimpleNamespace(num_experts=s.num_experts, n=s.n, k=s.k, m=m)
    triton_gg.grouped_gemm_forward(inp.x_tokens, inp.w, inp.m_sizes, inp.gather, inp.topk,
                                   permute_x=True, autotune=True)  # tunes if not cached
    fwd_cfg = triton_gg.autotune.cached(triton_gg.autotune.key_for(
        "forward", dims, inp.x.dtype, inp.x.device, permute_x=True))
    h = torch.empty((m, s.n), dtype=inp.x.dtype, device="cuda")
    a = torch.empty((m, inter), dtype=inp.x.dtype, device="cuda")

    def gemm_only():
        launch_forward(inp.x_tokens, inp.w, inp.m_sizes, inp.gather, None, h, h,
                       topk=inp.topk, permute_x=True, permute_y=False, fuse_mul_post=False,
                       store_unweighted=False, config=fwd_cfg)

    def gated():
        gemm_only()
        launch_silu_mul(h, a, inp.m_sizes)
    times = time_torch_interleaved({"persistent GEMM + silu_mul": gated,
                                    "persistent GEMM alone": gemm_only})
    for variant, ms in times.items():
        tf = problem.flops / ms / 1e9
        rows.append(dict(shape=name, tokens=tokens, impl="swiglu_forward", variant=variant,
                         ms=ms, tflops=tf))
        print(f"{name:10s} {variant:28s} {ms:8.4f} ms {tf:7.1f} TF/s", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="qwen3_w1,qwen3_w2,llama4_w1,gptoss_w1")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--json")
    parser.add_argument("--op", default="forward", choices=["forward", "dW", "swiglu"])
    args = parser.parse_args(argv)
    rows: list = []
    start = time.time()
    for name in args.shapes.split(","):
        run = {"dW": run_dw, "swiglu": run_swiglu}.get(args.op, run_shape)
        run(name, args.tokens, rows)
    print(f"done in {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
