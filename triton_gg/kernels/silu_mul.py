"""A = silu(gate) * up on H = [gate | up] rows: A [M, I] from H [M, 2I], one pass.

The elementwise half of the SwiGLU forward when H comes from the plain (persistent) forward
GEMM instead of the fused SwiGLU GEMM's epilogue: fp32 inside, A rounded once, computed from
the rounded H exactly as the fused epilogue does (the backward differentiates the stored H).
Measured against the fused kernel by ``python -m benchmarks.persistent_probe --op swiglu``.
"""

import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(h_ptr, a_ptr, M, I: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows[:, None] < M) & (cols[None, :] < I)
    rows64 = rows.to(tl.int64)
    h_offsets = rows64[:, None] * (2 * I) + cols[None, :]
    gate = tl.load(h_ptr + h_offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + h_offsets + I, mask=mask, other=0.0).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up
    tl.store(a_ptr + rows64[:, None] * I + cols[None, :], a.to(a_ptr.dtype.element_ty),
             mask=mask)


def launch_silu_mul(h, a, *, block_m=32, block_i=128, num_warps=4):
    """a [M, I] (preallocated) from h [M, 2I], both contiguous."""
    m, inter = a.shape
    if m == 0 or inter == 0:
        return a
    grid = (triton.cdiv(m, block_m), triton.cdiv(inter, block_i))
    _silu_mul_kernel[grid](h, a, m, inter, BLOCK_M=block_m, BLOCK_I=block_i,
                           num_warps=num_warps)
    return a
