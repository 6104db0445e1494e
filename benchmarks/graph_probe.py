"""python -m benchmarks.graph_probe STAGE: can a piece of triton_gg's expert block be captured
in a CUDA graph? STAGE: route | fwd_nograd | fwd | step | host [TOKENS]. ``host`` captures
nothing: it reports the host time (no GPU wait) of the forward's steps, to see whether the
GPU waits for the host before the first GEMM. One stage per process (a failed
capture poisons the CUDA context). Qwen3-30B-A3B shapes, T=1024 (default), bf16; with
TOKENS >= 4096 also eager against graph-replay time (do_bench, L2 flushed)."""

import sys

import torch


def run_steps(hidden, gate_up, down, idx, w, e, k):
    """The fused block's forward as separately timed host steps (names, callables)."""
    from gg_spec.checks import routing_trusted
    from triton_gg import _block_ops, moe
    from triton_gg.api import grouped_gemm
    from triton_gg.routing import route_with_positions
    state = {}

    def route():
        state["r"] = route_with_positions(idx, e)

    def configs():  # inside routing_trusted, as the block calls it (no value check)
        m_sizes, gather, _ = state["r"]
        with routing_trusted():
            state["c"] = moe._first_gemm_configs(hidden, gate_up, m_sizes, gather, k, True)

    def first_gemm():
        m_sizes, gather, pos = state["r"]
        state["a"] = _block_ops.swiglu_gemm(hidden, gate_up, m_sizes, gather, k, True,
                                            *state["c"], pos)

    def second_gemm():
        m_sizes, gather, _ = state["r"]
        with routing_trusted():
            state["y"] = grouped_gemm(state["a"], down, m_sizes, gather, k, autotune=True)

    def combine():
        m_sizes, _, pos = state["r"]
        return _block_ops.combine(state["y"], w.reshape(-1), pos, m_sizes, k)
    return [("route", route), ("first-GEMM configs", configs), ("SwiGLU GEMM", first_gemm),
            ("second GEMM", second_gemm), ("combine", combine)]


def _host_times(steps, reps: int = 20) -> int:
    """Median host microseconds of each step (GPU drained before each: host work only)."""
    import statistics
    import time
    for _, fn in steps:  # warm-up (tuning, compilation)
        fn()
    samples = {name: [] for name, _ in steps}
    for _ in range(reps):
        for name, fn in steps:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    for name, v in samples.items():
        print(f"host {name:20s} {statistics.median(v):8.1f} us")
    return 0


def main(stage: str, tokens: int = 1024) -> int:
    import triton_gg
    from triton_gg.routing import route_with_positions
    e, h, i, k, t = 128, 2048, 768, 8, tokens
    dev, dt = "cuda", torch.bfloat16
    hidden = torch.randn(t, h, device=dev, dtype=dt, requires_grad=True)
    gate_up = (torch.randn(e, 2 * i, h, device=dev, dtype=dt) * h**-0.5).requires_grad_(True)
    down = (torch.randn(e, h, i, device=dev, dtype=dt) * i**-0.5).requires_grad_(True)
    idx = torch.topk(torch.randn(t, e, device=dev), k, dim=-1).indices
    w = torch.softmax(torch.randn(t, k, device=dev), -1).requires_grad_(True)
    dout = torch.randn(t, h, device=dev, dtype=dt)
    params = (hidden, gate_up, down, w)

    def run():
        if stage == "route":
            return route_with_positions(idx, e)
        if stage == "fwd_nograd":
            with torch.no_grad():
                return triton_gg.moe_experts(hidden, gate_up, down, idx, w)
        out = triton_gg.moe_experts(hidden, gate_up, down, idx, w, autotune=True)
        if stage == "fwd":
            return out
        return torch.autograd.grad(out, params, dout)

    if stage == "host":
        return _host_times(run_steps(hidden, gate_up, down, idx, w, e, k))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        torch.cuda.synchronize()
        print(f"{stage}: captured and replayed")
        if tokens >= 4096:  # eager against graph replay, do_bench (L2 flushed), T tokens
            import triton.testing
            eager = triton.testing.do_bench(run, return_mode="median")
            replay = triton.testing.do_bench(graph.replay, return_mode="median")
            print(f"{stage} T={tokens}: eager {eager:.3f} ms, graph replay {replay:.3f} ms")
        return 0
    except Exception as exc:  # noqa: BLE001
        import traceback
        print(f"{stage}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc(limit=12)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], *(int(a) for a in sys.argv[2:])))
