"""Probe: tile configs of the persistent forward kernel (triton_gg/kernels/forward.py)
against the public function with its tuned config and torch._grouped_mm, same process,
same inputs (random routing), timed in interleaved rounds (CUDA-event medians, warm L2;
benchmarks/timing.py). ``--op dX``: the tuned dX against torch._grouped_mm's; ``--op dW``:
dW tile configs, each with pointer and TMA loads and with pointer and TMA stores;
``--op swiglu``: the block's first GEMM with and without the silu-mul pass.
(Session 5 timed the forward with full tiles stored through TMA too: 2-6% slower, removed;
benchmarks/NOTES.md step 14. Session 6 timed each variant with experts' short tails as
half-height tiles in a second loop: 2-5% slower, removed; step 15. Session 7 timed dW
with its tile and row loops written as one loop against this kernel: up to 1.57x the time
with pointer loads, 0.89-1.15x with TMA loads, never ahead of the best tile; removed; step
16.)
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
from benchmarks.timing import time_torch_interleaved
from benchmarks.torch_impls import TorchInputs
from gg_spec import DWConfig, ForwardConfig

# (name, config, programs per SM)
_T = dict(tma_load_w=True, tma_load_x=True)
VARIANTS = [
    ("p128x256_g8", ForwardConfig(128, 256, 64, 8, 3, 8, **_T), 1),
    ("p128x256_g8_ws", ForwardConfig(128, 256, 64, 8, 3, 8, **_T, warp_specialize=True), 1),
    ("p128x128_g8_w4x2", ForwardConfig(128, 128, 64, 4, 3, 8, **_T), 2),
]


def _fusions(first_gemm: bool):
    """(name, permute_x, permute_y, fuse_mul) beyond the plain forward."""
    return [("permute_x", True, False, False)] if first_gemm else [
        ("permute_y_mul", False, True, True)]


def _with_stores(variants, field):
    """Each (name, config, ...) as is and with its output stored through TMA."""
    out = []
    for name, config, *rest in variants:
        out.append((name, config, *rest))
        out.append((name + "+tma_store", config.replace(**{field: True}), *rest))
    return out


def _report(rows, times, outputs, ref, problem, name, impl_of):
    """Rows (and a printed line) for each timed variant, with the max relative error of
    its output against `ref`."""
    scale = ref.float().abs().max().item() or 1.0
    for key, ms in times.items():
        impl, variant = impl_of(key)
        if isinstance(ms, Exception):
            print(f"{name} {impl} {variant}: failed: {str(ms).splitlines()[0][:160]}",
                  flush=True)
            continue
        out = outputs.get(key)
        err = None if out is None else (out.float() - ref.float()).abs().max().item() / scale
        tf = problem.flops / ms / 1e9
        rows.append(dict(shape=name, tokens=problem.tokens, impl=impl, variant=variant, ms=ms,
                         tflops=tf, rel_err=err))
        print(f"{name:10s} {impl:24s} {variant:28s} {ms:8.4f} ms {tf:7.1f} TF/s"
              + (f"  err {err:.1e}" if err is not None else ""), flush=True)


def run_shape(name: str, tokens: int, rows: list):
    """The forward: the public function (tuned config), torch._grouped_mm and the variants
    (bare launches into a NaN-poisoned output), timed in interleaved rounds."""
    import triton_gg
    import gg_spec
    from triton_gg.kernels.forward import launch_forward

    problem = make_problem(name, tokens)
    inp = TorchInputs(problem)
    routing = (inp.m_sizes, inp.gather, inp.topk)
    m, n = problem.m, problem.shape.n
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    w_t = inp.w.transpose(1, 2)
    for fusion, px, py, mul in [("plain", False, False, False)] + _fusions(
            problem.shape.is_first_gemm):
        x = inp.x_tokens if px else inp.x
        kw = dict(permute_x=px, permute_y=py, fuse_mul_post=mul)
        weights = inp.topk_weights if mul else None

        def public(x=x, kw=kw, weights=weights):
            return triton_gg.grouped_gemm_forward(x, inp.w, *routing, autotune=True,
                                                  topk_weights=weights, **kw)
        ref = public()
        fns = {(f"triton_gg_{fusion}", "tuned"): public}
        if fusion == "plain":  # torch._grouped_mm for scale, once per shape
            fns[("torch_grouped_mm", "-")] = lambda: torch._grouped_mm(inp.x, w_t,
                                                                       offs=inp.offs)
        outputs = {}
        for vname, config, per_sm in VARIANTS:
            if px:
                config = config.replace(tma_load_x=False)
            y = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
            outputs[(f"persistent_{fusion}", vname)] = y
            fns[(f"persistent_{fusion}", vname)] = (
                lambda x=x, y=y, config=config, per_sm=per_sm, kw=kw: launch_forward(
                    x, inp.w, inp.m_sizes, inp.gather, inp.topk_weights, y, y,
                    topk=inp.topk, store_unweighted=False, config=config,
                    programs=per_sm * sms, **kw))
        times = time_torch_interleaved(fns)
        _report(rows, times, outputs, ref, problem, name, lambda key: key)


DW_VARIANTS = [  # (name, config): the tuned config is timed too
    ("64x128x128_w8s3", DWConfig(64, 128, 128, 8, 3)),
    ("64x128x128_w4s3_x2", DWConfig(64, 128, 128, 4, 3)),
    ("64x256x128_w8s3", DWConfig(64, 256, 128, 8, 3)),
    ("64x128x256_w8s3", DWConfig(64, 128, 256, 8, 3)),
    ("128x128x128_w8s3", DWConfig(128, 128, 128, 8, 3)),
]


def run_dw(name: str, tokens: int, rows: list):
    """dW on its persistent grid: the tuned config and a few others, each with its operands
    loaded by pointer loads and through TMA (per-expert descriptors) and its output tile
    stored by pointer stores and through TMA, timed in interleaved rounds."""
    import gg_spec
    import triton_gg
    from triton_gg.kernels.dw import launch_dw
    problem = make_problem(name, tokens)
    inp = TorchInputs(problem)
    s = problem.shape
    ref = triton_gg.grouped_gemm_dW(inp.x, inp.dy, inp.m_sizes, inp.gather, inp.topk,
                                    autotune=True)
    dims = SimpleNamespace(num_experts=s.num_experts, n=s.n, k=s.k, m=problem.m)
    tuned = triton_gg.autotune.cached(triton_gg.autotune.key_for(
        "dW", dims, inp.x.dtype, inp.x.device)) or gg_spec.default_config("dW")
    fns, outputs = {}, {}
    # each tile with pointer loads and with TMA loads ("tuned" names the tuned tile, its
    # row with the tuned config's own load setting is the one with or without the suffix)
    loads = [(name + ("+tma_loads" if on else ""), config.replace(tma_load_x=on,
                                                                  tma_load_dy=on))
             for name, config in [("tuned", tuned)] + DW_VARIANTS for on in (False, True)]
    for vname, config in _with_stores(loads, "tma_store_dw"):
        out = torch.full_like(inp.w, float("nan"))
        outputs[vname] = out
        fns[vname] = (lambda out=out, config=config: launch_dw(
            inp.x, inp.dy, inp.m_sizes, inp.gather, out, topk=inp.topk, permute_x=False,
            permute_y=False, config=config))
    times = time_torch_interleaved(fns)
    _report(rows, times, outputs, ref, problem, name, lambda key: ("dW_persistent", key))


def run_dx(name: str, tokens: int, rows: list):
    """dX with its tuned config, plain and with the shape's fusion, timed in interleaved
    rounds; torch._grouped_mm's dX (dY @ W) for scale."""
    import gg_spec
    import triton_gg
    from triton_gg.kernels.dx import launch_dx
    problem = make_problem(name, tokens)
    inp = TorchInputs(problem)
    s = problem.shape
    dims = SimpleNamespace(num_experts=s.num_experts, n=s.n, k=s.k, m=problem.m)
    fns, outputs, refs = {}, {}, {}
    flags = [("plain", False, False)] + ([("permute_x", True, False)] if s.is_first_gemm
                                         else [("permute_y", False, True)])
    for fusion, px, py in flags:
        refs[fusion] = triton_gg.grouped_gemm_dX(inp.dy, inp.w, inp.m_sizes, inp.gather,
                                                 inp.topk, permute_x=px, permute_y=py,
                                                 autotune=True)
        tuned = triton_gg.autotune.cached(triton_gg.autotune.key_for(
            "dX", dims, inp.x.dtype, inp.x.device, permute_x=px, permute_y=py))
        key = (f"dX_{fusion}", "tuned")
        out = torch.full((problem.m, s.k), float("nan"), dtype=inp.x.dtype, device="cuda")
        outputs[key] = out
        fns[key] = (lambda out=out, tuned=tuned, px=px, py=py: launch_dx(
            inp.dy, inp.w, inp.m_sizes, inp.gather, out, permute_x=px, permute_y=py,
            config=tuned))
    w = inp.w
    fns[("torch_grouped_mm_dX", "-")] = lambda: torch._grouped_mm(inp.dy, w, offs=inp.offs)
    times = time_torch_interleaved(fns)
    for fusion in refs:  # each fusion against its own public result; torch with plain
        mine = {k: v for k, v in times.items() if k[0] == f"dX_{fusion}"
                or (fusion == "plain" and k[0] == "torch_grouped_mm_dX")}
        _report(rows, mine, outputs, refs[fusion], problem, name, lambda key: key)


def run_swiglu(name: str, tokens: int, rows: list):
    """The block's first GEMM forward (permute_x, SiLU-gated) as the block runs it (the
    persistent forward writing H, then one silu-mul pass) against the GEMM alone: the cost
    of the gating pass. (Session 4 also timed the former fused kernel here, SiLU-gating in
    a one-tile-per-program GEMM's epilogue: benchmarks/NOTES.md step 13.)"""
    import gg_spec
    import triton_gg
    from triton_gg.kernels.forward import launch_forward
    from triton_gg.kernels.silu_mul import launch_silu_mul
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
    parser.add_argument("--op", default="forward", choices=["forward", "dX", "dW", "swiglu"])
    args = parser.parse_args(argv)
    rows: list = []
    start = time.time()
    for name in args.shapes.split(","):
        run = {"dX": run_dx, "dW": run_dw, "swiglu": run_swiglu}.get(args.op, run_shape)
        run(name, args.tokens, rows)
    print(f"done in {time.time() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
