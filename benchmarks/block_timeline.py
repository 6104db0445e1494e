"""python -m benchmarks.block_timeline: where triton_gg's expert-block forward spends its
time under the block benchmark's conditions (L2 flushed before each call, calls back to
back, as ``triton.testing.do_bench`` runs them).

The block forward's kernels sum to ~1.21 ms in a warm-L2 profile while do_bench reads
~1.39 ms (benchmarks/NOTES.md steps 12-14). This records a CUDA-activity trace of REPS
flushed forward calls and prints, for the median call: each kernel's start (from the end of
the flush), its duration and the idle gap before it, so that launch gaps, a slow kernel
right after the flush and kernel durations can be told apart.

    python -m benchmarks.block_timeline [--tokens 8192] [--reps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks.moe_block import block_inputs


def _kernels(trace_path: str) -> list[dict]:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memset")]
    return sorted(kernels, key=lambda e: e["ts"])


def _split_calls(kernels: list[dict]) -> list[list[dict]]:
    """The kernels of each call: those after one flush (the cache-sized fill) and before
    the next."""
    calls, current = [], None
    for k in kernels:
        if _is_flush(k):
            if current:
                calls.append(current)
            current = [k]
        elif current is not None:
            current.append(k)
    if current:
        calls.append(current)
    return [c for c in calls if len(c) > 1]


def _is_flush(kernel: dict) -> bool:
    """The 256 MB zero fill (a memset or fill kernel of tens of microseconds; the block's
    own fills are a few microseconds)."""
    name = kernel["name"].lower()
    return ("fill" in name or "memset" in name) and kernel["dur"] > 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.block_timeline")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import triton.testing

    import gg_spec
    import triton_gg
    hidden, gate_up, down, idx, weights, _ = block_inputs(args.tokens)

    def forward():
        return triton_gg.moe_experts(hidden, gate_up, down, idx, weights, autotune=True)
    forward()  # tuning, compilation
    do_bench_ms = triton.testing.do_bench(forward, return_mode="median")
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # do_bench's size
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.reps):
            flush.zero_()
            forward()
        torch.cuda.synchronize()
    path = "/tmp/block_timeline_trace.json"
    prof.export_chrome_trace(path)
    calls = _split_calls(_kernels(path))
    if not calls:
        raise SystemExit(f"no flushed call recognised in {path}: no memset or fill kernel "
                         f"over 20 us (a profiler that names kernels differently?)")
    spans = []
    for call in calls:
        flush_end = call[0]["ts"] + call[0]["dur"]
        last = call[-1]
        spans.append(last["ts"] + last["dur"] - flush_end)
    median_index = sorted(range(len(spans)), key=lambda i: spans[i])[len(spans) // 2]
    call = calls[median_index]
    rows, prev_end = [], call[0]["ts"] + call[0]["dur"]
    start0 = prev_end
    print(f"do_bench (L2 flushed, median): {do_bench_ms * 1e3:.0f} us;  traced calls: "
          f"{len(calls)}, span after the flush: median {statistics.median(spans):.0f} us "
          f"(min {min(spans):.0f}, max {max(spans):.0f})")
    print(f"{'start':>7s} {'gap':>6s} {'dur':>7s}  kernel (the median call)")
    for k in call[1:]:
        gap = k["ts"] - prev_end
        rows.append({"name": k["name"], "start_us": k["ts"] - start0, "gap_us": gap,
                     "dur_us": k["dur"]})
        print(f"{k['ts'] - start0:7.0f} {gap:6.1f} {k['dur']:7.1f}  {k['name'][:70]}")
        prev_end = max(prev_end, k["ts"] + k["dur"])
    busy = sum(r["dur_us"] for r in rows)
    idle = sum(max(0.0, r["gap_us"]) for r in rows)
    print(f"kernels {busy:.0f} us + gaps {idle:.0f} us = span {spans[median_index]:.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "tokens": args.tokens,
                       "do_bench_ms": do_bench_ms, "spans_us": spans,
                       "median_call": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
