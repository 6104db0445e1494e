"""float32 on the GPU (issue 16): the default configs that fit Hopper's shared memory in fp32,
their accuracy against float64, and the forward's fp32 fallback candidates timed against each
other (IEEE fp32 dots run on the FMA units: the tile that fits is a speed question).

    python -m benchmarks.fp32_probe
"""

from __future__ import annotations

import sys


def sweep() -> int:
    """Smaller tiles for all three ops in fp32 (``--sweep``): the FMA dot's speed depends on
    the tile far more than on the pipeline depth."""
    import torch
    import triton_gg
    from gg_spec import DWConfig, DXConfig, ForwardConfig
    from triton_gg.timing import time_in_rounds

    dev = "cuda"
    e, n, k, tokens, topk = 128, 1536, 2048, 512, 8
    x = torch.randn(tokens * topk, k, device=dev)
    w = torch.randn(e, n, k, device=dev) / k ** 0.5
    dy = torch.randn(tokens * topk, n, device=dev)
    ids = torch.randint(0, e, (tokens, topk), device=dev)
    m_sizes, gather = triton_gg.route(ids, e)
    tiles = [(128, 256, 64, 8, 2), (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 64, 64, 4, 3),
             (128, 64, 32, 4, 3), (32, 64, 32, 4, 3), (64, 128, 32, 8, 3), (32, 128, 32, 4, 3),
             (64, 64, 16, 4, 4), (128, 128, 32, 8, 3)]
    flop = 2 * tokens * topk * n * k
    runs = {
        "forward": (ForwardConfig, lambda c: triton_gg.grouped_gemm_forward(
            x, w, m_sizes, gather, topk, config=c)),
        "dX": (DXConfig, lambda c: triton_gg.grouped_gemm_dX(dy, w, m_sizes, gather, topk,
                                                              config=c)),
        "dW": (DWConfig, lambda c: triton_gg.grouped_gemm_dW(x, dy, m_sizes, gather, topk,
                                                              config=c)),
    }
    for op, (cls, run) in runs.items():
        fns = {}
        for bm, bn, bk, warps, stages in tiles:
            cfg = cls(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            fns[f"{bm}x{bn}x{bk} w{warps} s{stages}"] = (lambda c: lambda: run(c))(cfg)
        fns["default(fp32)"] = (lambda c: lambda: run(c))(
            __import__("gg_spec").default_config(op, "float32"))
        for name, ms in time_in_rounds(fns, rounds=3, calls=3).items():
            if isinstance(ms, Exception):
                print(f"{op} {name}: {type(ms).__name__}: {str(ms)[:150]}", flush=True)
            else:
                print(f"{op} {name}: {ms:.2f} ms, {flop / ms / 1e9:.2f} TFLOP/s", flush=True)
    return 0


def main() -> int:
    if "--sweep" in sys.argv:
        return sweep()
    import torch
    import triton_gg
    import gg_spec
    from gg_spec import ForwardConfig
    from triton_gg.timing import time_in_rounds

    dev = "cuda"
    torch.manual_seed(0)
    failed = 0
    # accuracy of the default path in fp32 (forward, dX, dW through autograd) on a real shape
    e, n, k, tokens, topk = 128, 1536, 2048, 2048, 8
    x = torch.randn(tokens, k, device=dev)
    w = torch.randn(e, n, k, device=dev) / k ** 0.5
    ids = torch.randint(0, e, (tokens, topk), device=dev)
    m_sizes, gather = triton_gg.route(ids, e)
    for name, kw in (("plain", {}), ("permute_x", {"permute_x": True})):
        xin = (x if kw else x[gather.long() // topk]).clone().requires_grad_()
        win = w.clone().requires_grad_()
        y = triton_gg.grouped_gemm(xin, win, m_sizes, gather, topk, **kw)
        dy = torch.randn_like(y)
        y.backward(dy)
        rows = gather.long() // topk
        x64 = x.double()[rows] if kw else xin.detach().double()
        ref = torch.empty_like(y, dtype=torch.float64)
        for i in range(e):
            s = slice(int(m_sizes[:i].sum()), int(m_sizes[:i + 1].sum()))
            ref[s] = x64[s] @ w.double()[i].T
        err = ((y.double() - ref).norm() / ref.norm()).item()
        dw_ref = torch.zeros_like(w, dtype=torch.float64)
        for i in range(e):
            s = slice(int(m_sizes[:i].sum()), int(m_sizes[:i + 1].sum()))
            dw_ref[i] = dy.double()[s].T @ x64[s]
        dw_err = ((win.grad.double() - dw_ref).norm() / dw_ref.norm()).item()
        ok = err < 1e-4 and dw_err < 1e-4
        failed += not ok
        print(f"fp32 grouped_gemm {name}: rel err Y {err:.2e}, dW {dw_err:.2e} "
              f"{'ok' if ok else 'FAILED'}", flush=True)

    # the forward's fp32 candidates at qwen3_30b_a3b w1 (N = 1536, K = 2048) and w2
    for n, k in ((1536, 2048), (2048, 768)):
        w = torch.randn(e, n, k, device=dev) / k ** 0.5
        xs = torch.randn(tokens * topk, k, device=dev)
        candidates = {
            "default(fp32)": gg_spec.default_config("forward", "float32"),
            "128x256x32 s3": ForwardConfig(block_k=32),
            "128x256x32 s4": ForwardConfig(block_k=32, num_stages=4),
            "128x128x64 w4 s3": ForwardConfig(block_n=128, num_warps=4),
            "128x128x32 w4 s4": ForwardConfig(block_n=128, block_k=32, num_warps=4,
                                              num_stages=4),
            "128x128x64 w8 s3": ForwardConfig(block_n=128, num_stages=3),
            "64x256x32 s3": ForwardConfig(block_m=64, block_k=32),
        }
        fns = {}
        for name, cfg in candidates.items():
            assert gg_spec.fits("forward", cfg, "float32"), name
            fns[name] = (lambda c: lambda: triton_gg.grouped_gemm_forward(
                xs, w, m_sizes, gather, topk, config=c))(cfg)
        times = time_in_rounds(fns)
        flop = 2 * tokens * topk * n * k
        for name, ms in times.items():
            if isinstance(ms, Exception):
                print(f"N={n} K={k} {name}: {type(ms).__name__}: {str(ms)[:200]}")
            else:
                print(f"N={n} K={k} {name}: {ms:.3f} ms, {flop / ms / 1e9:.1f} TFLOP/s",
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
