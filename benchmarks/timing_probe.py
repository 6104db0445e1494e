"""Diagnostic: why do a kernel's CUDA-event medians differ between harnesses?

Times the same triton_gg forward (its tuned config) four ways on one problem: the public
function and the bare launch, each with benchmarks.timing.time_torch (back-to-back calls,
warm L2) and with triton.testing.do_bench (L2 flushed before each call), and reads the SM
clock and power draw after each (nvidia-smi), to separate host overhead, cache state and
clock throttling under sustained load.

    python -m benchmarks.timing_probe --shapes llama4_w1,qwen3_w1
"""

from __future__ import annotations

import argparse
import subprocess
from types import SimpleNamespace

import torch
import triton.testing

import gg_spec
from benchmarks.problems import make_problem
from benchmarks.timing import time_torch
from benchmarks.torch_impls import TorchInputs


def _clock() -> str:
    q = "clocks.sm,power.draw,temperature.gpu"
    return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def main(argv=None):
    import triton_gg
    from triton_gg import _ops
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama4_w1,qwen3_w1")
    parser.add_argument("--op", default="forward", choices=["forward", "dW"])
    args = parser.parse_args(argv)
    for name in args.shapes.split(","):
        prob = make_problem(name, 8192)
        inp = TorchInputs(prob)
        routing = (inp.m_sizes, inp.gather, inp.topk)

        def public():
            return triton_gg.grouped_gemm_forward(inp.x, inp.w, *routing, autotune=True)
        public()
        dims = SimpleNamespace(num_experts=prob.shape.num_experts, n=prob.shape.n,
                               k=prob.shape.k, m=prob.m)
        key = triton_gg.autotune.key_for("forward", dims, inp.x.dtype, inp.x.device)
        config = triton_gg.autotune.cached(key) or gg_spec.default_config("forward")

        def bare():
            return _ops.forward_impl(inp.x, inp.w, inp.m_sizes, None, None, inp.topk, False,
                                     False, False, False, _ops.encode(config))
        if args.op == "dW":
            from triton_gg.kernels.dw import launch_dw

            def public():
                return triton_gg.grouped_gemm_dW(inp.x, inp.dy, *routing, autotune=True)
            public()
            config = triton_gg.autotune.cached(triton_gg.autotune.key_for(
                "dW", dims, inp.x.dtype, inp.x.device))
            out = torch.empty_like(inp.w)

            def bare():  # preallocated output: no allocation per call
                return launch_dw(inp.x, inp.dy, inp.m_sizes, None, out, topk=inp.topk,
                                 permute_x=False, permute_y=False, config=config)
        dense_b = inp.dense_b

        def dense():
            return torch.mm(inp.x, dense_b)
        print(f"== {name}: {config.key()}", flush=True)
        for label, fn in (("public", public), ("bare", bare), ("dense", dense),
                          ("public", public)):
            for method, timer in (("time_torch", time_torch),
                                  ("time_torch_1", lambda f: time_torch(f, inner=1, reps=21)),
                                  ("do_bench", lambda f: triton.testing.do_bench(
                                      f, warmup=5, rep=25, return_mode="median"))):
                ms = timer(fn)
                print(f"   {label:7s} {method:10s} {ms:8.4f} ms {prob.flops / ms / 1e9:7.1f} "
                      f"TF/s   [{_clock()}]", flush=True)


if __name__ == "__main__":
    main()
