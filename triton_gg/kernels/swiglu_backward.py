"""Backward of A = silu(gate) * up on H = [gate | up] rows: dH [M, 2I] from dA [M, I], H.

    s = sigmoid(gate);  d_up = dA * gate * s;  d_gate = dA * up * s * (1 + gate * (1 - s))

One pass (reads H and dA once, writes dH once), fp32 inside; in place of the three or four
elementwise kernels autograd runs for chunk, silu and mul. Only rows below sum(m_sizes) are
read and written, as in ``silu_mul.py``: rows past it belong to dropped routing slots, whose
H no GEMM wrote and whose dH no GEMM reads (on an expert-parallel rank, most of the rows).
"""

import triton
import triton.language as tl

from triton_gg.kernels.schedule import next_pow2, routed_rows


@triton.jit
def _swiglu_backward_kernel(h_ptr, da_ptr, dh_ptr, m_sizes_ptr, M, E, I: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
                            E_POW2: tl.constexpr):
    # never past M, even for m_sizes that overcount (value checks off)
    routed = tl.minimum(routed_rows(m_sizes_ptr, E, E_POW2), M)
    first = tl.program_id(0).to(tl.int64) * BLOCK_M
    if first >= routed:
        return
    rows64 = first + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows64[:, None] < routed) & (cols[None, :] < I)
    h_offsets = rows64[:, None] * (2 * I) + cols[None, :]
    gate = tl.load(h_ptr + h_offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + h_offsets + I, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + rows64[:, None] * I + cols[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    d_up = da * gate * s
    d_gate = da * up * s * (1.0 + gate * (1.0 - s))
    out_ty = dh_ptr.dtype.element_ty
    tl.store(dh_ptr + h_offsets, d_gate.to(out_ty), mask=mask)
    tl.store(dh_ptr + h_offsets + I, d_up.to(out_ty), mask=mask)


def launch_swiglu_backward(h, da, dh, m_sizes, *, block_m=32, block_i=128, num_warps=4):
    """dh [M, 2I] (preallocated; may be h itself) from h [M, 2I] and da [M, I], all
    contiguous; rows below sum(m_sizes [E]) only."""
    m, inter = da.shape
    if m == 0 or inter == 0 or m_sizes.numel() == 0:
        return dh
    grid = (triton.cdiv(m, block_m), triton.cdiv(inter, block_i))
    _swiglu_backward_kernel[grid](h, da, dh, m_sizes, m, m_sizes.shape[0], inter,
                                  BLOCK_M=block_m, BLOCK_I=block_i,
                                  E_POW2=next_pow2(m_sizes.shape[0]), num_warps=num_warps)
    return dh
