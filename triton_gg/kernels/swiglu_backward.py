"""Backward of A = silu(gate) * up on H = [gate | up] rows: dH [M, 2I] from dA [M, I], H.

    s = sigmoid(gate);  d_up = dA * gate * s;  d_gate = dA * up * s * (1 + gate * (1 - s))

One pass (reads H and dA once, writes dH once), fp32 inside; in place of the three or four
elementwise kernels autograd runs for chunk, silu and mul.
"""

import triton
import triton.language as tl


@triton.jit
def _swiglu_backward_kernel(h_ptr, da_ptr, dh_ptr, M, I: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows[:, None] < M) & (cols[None, :] < I)
    rows64 = rows.to(tl.int64)
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


def launch_swiglu_backward(h, da, dh, *, block_m=32, block_i=128, num_warps=4):
    """dh [M, 2I] (preallocated) from h [M, 2I] and da [M, I], all contiguous."""
    m, inter = da.shape
    if m == 0 or inter == 0:
        return dh
    grid = (triton.cdiv(m, block_m), triton.cdiv(inter, block_i))
    _swiglu_backward_kernel[grid](h, da, dh, m, inter, BLOCK_M=block_m, BLOCK_I=block_i,
                                  num_warps=num_warps)
    return dh
