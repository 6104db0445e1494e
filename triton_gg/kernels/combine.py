"""Top-k combine of an MoE block and its backward.

Forward:  out[t] = sum_j w[t*k + j] * Y[pos[t*k + j]]          Y [M, H] in expert order
Backward: dY[pos[r]] = w[r] * dO[r // k]        (dY in expert order, ready for TMA loads)
          dw[r]      = <dO[r // k], Y[pos[r]]>

pos[r] is the expert-order position of routed row r (the inverse of the gather indices).
Rows at positions >= sum(m_sizes) were dropped by the routing (expert ids outside [0, E):
another rank's experts): no GEMM wrote them, so they are never read and contribute nothing
(their weight is zero and their Y row may hold anything).
The routing weight is applied here rather than in the second GEMM's epilogue: Y is then
stored once (not weighted and unweighted), and the backward's dY is formed in one pass
that also yields the routing weights' gradient. fp32 accumulation; a token's k rows are
summed in a fixed order (deterministic).
"""

import triton
import triton.language as tl

from triton_gg.kernels.schedule import next_pow2, routed_rows


@triton.jit(do_not_specialize=["M"])
def _combine_kernel(y_ptr, w_ptr, pos_ptr, m_sizes_ptr, out_ptr, TOPK: tl.constexpr, E,
                    H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                    E_POW2: tl.constexpr, T, M):
    # M: the rows of Y. Never past them, even for m_sizes that overcount (value checks off)
    rows_written = tl.minimum(routed_rows(m_sizes_ptr, E, E_POW2), M)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = tokens < T
    mask = t_mask[:, None] & (cols[None, :] < H)
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    # unrolled (k is a compile-time constant): a token's k row loads are all in flight at
    # once instead of one dependent round trip per slot
    for j in tl.static_range(TOPK):
        routed = tokens.to(tl.int64) * TOPK + j
        p = tl.load(pos_ptr + routed, mask=t_mask, other=0).to(tl.int64)
        # a position outside [0, rows_written) (dropped, or garbage from bad routing) is
        # not read
        written = (p >= 0) & (p < rows_written)
        # a dropped slot's weight is not read either: w * 0 is NaN for a NaN / Inf weight
        w = tl.load(w_ptr + routed, mask=t_mask & written, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + p[:, None] * H + cols[None, :], mask=mask & written[:, None],
                    other=0.0)
        acc += w[:, None] * y.to(tl.float32)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * H + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _combine_backward_kernel(y_ptr, w_ptr, pos_ptr, m_sizes_ptr, do_ptr, dy_ptr, dw_ptr, R,
                             TOPK, E, M, H: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_H: tl.constexpr, E_POW2: tl.constexpr,
                             NEED_DW: tl.constexpr):
    # M: the rows of Y and dY. Never past them, even for m_sizes that overcount
    rows_written = tl.minimum(routed_rows(m_sizes_ptr, E, E_POW2), M)
    routed = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = routed < R
    routed = routed.to(tl.int64)
    p = tl.load(pos_ptr + routed, mask=r_mask, other=0).to(tl.int64)
    # pos comes from the gather indices: with bad ones (value checks off: out of range or
    # repeated, which leaves entries of the inverse unset) it may hold anything, so a
    # position outside [0, M) is neither stored to nor read
    stored = r_mask & (p >= 0) & (p < M)
    written = stored & (p < rows_written)
    w = tl.load(w_ptr + routed, mask=r_mask, other=0.0).to(tl.float32)
    token = routed // TOPK
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        mask = r_mask[:, None] & (cols[None, :] < H)
        do = tl.load(do_ptr + token[:, None] * H + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        tl.store(dy_ptr + p[:, None] * H + cols[None, :],
                 (w[:, None] * do).to(dy_ptr.dtype.element_ty), mask=mask & stored[:, None])
        if NEED_DW:
            y = tl.load(y_ptr + p[:, None] * H + cols[None, :],
                        mask=mask & written[:, None], other=0.0).to(tl.float32)
            dot += tl.sum(do * y, axis=1)
    if NEED_DW:
        tl.store(dw_ptr + routed, dot.to(dw_ptr.dtype.element_ty), mask=r_mask)


def launch_combine(y, weights, pos, m_sizes, out, *, topk, block_t=4, block_h=512,
                   num_warps=4):
    """out [T, H] (preallocated) from y [M, H], weights [T*k], pos [T*k], m_sizes [E]."""
    tokens, h = out.shape
    if tokens == 0 or h == 0:
        return out
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(h, block_h))
    _combine_kernel[grid](y, weights, pos, m_sizes, out, topk, m_sizes.shape[0], h,
                          BLOCK_T=block_t, BLOCK_H=block_h,
                          E_POW2=next_pow2(m_sizes.shape[0]), T=tokens, M=y.shape[0],
                          num_warps=num_warps)
    return out


def launch_combine_backward(y, weights, pos, m_sizes, d_out, dy, d_weights, *, topk,
                            block_r=8, block_h=256, num_warps=4):
    """dy [M, H] and d_weights [T*k] (None: not needed) from d_out [T, H]."""
    routed, h = pos.shape[0], d_out.shape[1]
    if routed == 0 or h == 0:
        if d_weights is not None:
            d_weights.zero_()
        return dy, d_weights
    grid = (triton.cdiv(routed, block_r),)
    _combine_backward_kernel[grid](
        y, weights, pos, m_sizes, d_out, dy, d_weights if d_weights is not None else weights,
        routed, topk, m_sizes.shape[0], dy.shape[0], h, BLOCK_R=block_r, BLOCK_H=block_h,
        E_POW2=next_pow2(m_sizes.shape[0]), NEED_DW=d_weights is not None,
        num_warps=num_warps)
    return dy, d_weights
