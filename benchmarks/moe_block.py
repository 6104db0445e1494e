"""python -m benchmarks.moe_block: the whole MoE expert block (gate_up -> SiLU*mul -> down ->
weighted top-k sum), Qwen3-30B-A3B shapes, bf16, timed as ANCHORS.md table C
(`triton.testing.do_bench`, L2 flushed, median): triton_gg.moe_experts against a
torch._grouped_mm block (gather, two grouped_mm, index_add), forward and forward+backward,
with peak memory; the two outputs are compared first."""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


def grouped_mm_block(hidden, gate_up, down, idx, weights):
    """The torch._grouped_mm reference block: explicit gather, two grouped GEMMs, index_add."""
    tokens, topk = idx.shape
    flat = idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    x = hidden[order // topk]
    h = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden).index_add(0, order // topk, y)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_block")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import triton.testing

    import gg_spec
    import triton_gg
    gg_spec.set_value_checks(False)
    preset = gg_spec.get_preset("qwen3_30b_a3b")
    e, h_size, inter, k, t = (preset.num_experts, preset.hidden, preset.intermediate,
                              preset.topk, args.tokens)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device="cuda", dtype=dt) * scale)
    hidden = randn(t, h_size).requires_grad_(True)
    gate_up = randn(e, 2 * inter, h_size, scale=h_size**-0.5).requires_grad_(True)
    down = randn(e, h_size, inter, scale=inter**-0.5).requires_grad_(True)
    logits = torch.randn(t, e, generator=gen, device="cuda")
    top = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    idx, weights = top.indices, (top.values / top.values.sum(-1, keepdim=True)).to(dt)
    weights.requires_grad_(True)
    dout = randn(t, h_size)
    params = (hidden, gate_up, down, weights)

    impls = {
        "triton_gg": lambda: triton_gg.moe_experts(hidden, gate_up, down, idx, weights,
                                                    autotune=True),
        "torch_grouped_mm": lambda: grouped_mm_block(hidden, gate_up, down, idx, weights),
    }
    outs = {name: fn() for name, fn in impls.items()}
    ref = outs["torch_grouped_mm"].detach().double()
    err = float((outs["triton_gg"].detach().double() - ref).norm() / ref.norm())
    rows = [{"check": "rel error triton_gg vs torch_grouped_mm block", "value": err}]
    print(f"rel error triton_gg vs torch._grouped_mm block: {err:.2e}")
    for name, fn in impls.items():
        fwd_ms = triton.testing.do_bench(fn, return_mode="median")

        def step(fn=fn):
            torch.autograd.grad(fn(), params, dout)
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() / 2**30
        both_ms = triton.testing.do_bench(step, return_mode="median")
        rows.append({"impl": name, "tokens": t, "fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms,
                     "peak_gib": peak})
        print(f"{name:18s} fwd {fwd_ms:6.3f} ms   fwd+bwd {both_ms:6.3f} ms   "
              f"peak {peak:5.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "preset": "qwen3_30b_a3b",
                       "dtype": "bfloat16", "rows": rows}, f, indent=1)
    return 0 if err < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
