"""A = silu(gate) * up on H = [gate | up] rows: A [M, I] from H [M, 2I], one pass.

The elementwise half of the block's SwiGLU forward: H comes from the persistent forward GEMM
(permute_x), then this pass forms A. fp32 inside, A rounded once, from the rounded H (the
backward differentiates the stored H). Measured on the H200 against the former fused kernel
(SiLU-gating in a one-tile-per-program GEMM's epilogue): 0.827 against 0.908 ms at
Qwen3-30B-A3B's gate_up, 2.51 against 3.16 ms at Llama-4-Scout's, A identical
(benchmarks/NOTES.md step 13).

Only rows below sum(m_sizes) are read and written: rows past it belong to dropped routing
slots (other ranks' experts under expert parallelism), which the GEMM leaves unwritten; on a
rank holding 1/8 of the experts that is most of the rows. The SwiGLU backward pass
(``swiglu_backward.py``) is bounded the same way.
"""

import triton
import triton.language as tl

from triton_gg.kernels.schedule import next_pow2, routed_rows


@triton.jit
def _silu_mul_kernel(h_ptr, a_ptr, m_sizes_ptr, M, E, I: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, E_POW2: tl.constexpr):
    # never past M, even for m_sizes that overcount (value checks off)
    routed = tl.minimum(routed_rows(m_sizes_ptr, E, E_POW2), M)
    first = tl.program_id(0).to(tl.int64) * BLOCK_M
    if first >= routed:
        return
    rows = first + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows[:, None] < routed) & (cols[None, :] < I)
    h_offsets = rows[:, None] * (2 * I) + cols[None, :]
    gate = tl.load(h_ptr + h_offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + h_offsets + I, mask=mask, other=0.0).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up
    tl.store(a_ptr + rows[:, None] * I + cols[None, :], a.to(a_ptr.dtype.element_ty),
             mask=mask)


def launch_silu_mul(h, a, m_sizes, *, block_m=32, block_i=128, num_warps=4):
    """a [M, I] (preallocated) from h [M, 2I], both contiguous; rows < sum(m_sizes)."""
    m, inter = a.shape
    if m == 0 or inter == 0 or m_sizes.numel() == 0:
        return a
    grid = (triton.cdiv(m, block_m), triton.cdiv(inter, block_i))
    _silu_mul_kernel[grid](h, a, m_sizes, m, m_sizes.shape[0], inter, BLOCK_M=block_m,
                           BLOCK_I=block_i, E_POW2=next_pow2(m_sizes.shape[0]),
                           num_warps=num_warps)
    return a
