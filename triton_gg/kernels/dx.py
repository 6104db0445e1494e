"""dX grouped GEMM: dX[p] = dY[row(p)] @ W[e(p)], reducing over N.

* permute_y (the forward scattered Y): dY is in routed-row order, row p is read at gather[p].
* permute_x (the forward gathered X): row p of dX is stored at gather[p], so dX comes out in
  routed-row order [M, K]; the autograd op then sums each token's k rows.
"""

import torch
import triton
import triton.language as tl

from triton_gg._runtime import INTERPRETING
from triton_gg.kernels.schedule import clamp_index, locate_m_tile, next_pow2, swizzle
from triton_gg.kernels.tma import descriptor_2d, tma_usable, weights_2d


@triton.jit(do_not_specialize=["M"])
def _dx_kernel(
    dy_ptr, w_ptr, dy_desc, w_desc, dx_ptr, m_sizes_ptr, gather_ptr,
    E, M, N: tl.constexpr, K: tl.constexpr, num_m_tiles, stride_we, stride_wn, stride_wk,
    PERMUTE_X: tl.constexpr, PERMUTE_Y: tl.constexpr, TMA_W: tl.constexpr,
    TMA_DY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, E_POW2: tl.constexpr, EVEN_N: tl.constexpr,
    UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    m_tile, k_tile = swizzle(tl.program_id(0), num_m_tiles, num_k_tiles, GROUP_M)
    # M: the rows of dX, dY and gather; the schedule never reaches past them, whatever
    # m_sizes holds (``safe_sizes``)
    expert, expert_start, expert_rows, local_row = locate_m_tile(
        m_tile, m_sizes_ptr, E, M, BLOCK_M, E_POW2)
    if expert >= E:
        return

    rows = local_row + tl.arange(0, BLOCK_M)
    row_mask = rows < expert_rows
    pos = expert_start + rows
    if PERMUTE_X or PERMUTE_Y:
        # clamped into [0, M): an index outside would address dY or dX past their ends
        routed = clamp_index(tl.load(gather_ptr + pos, mask=row_mask, other=0), M)
        routed = routed.to(tl.int64)
    dy_rows = routed if PERMUTE_Y else pos

    cols = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    ns = tl.arange(0, BLOCK_N)
    dy_ptrs = dy_ptr + dy_rows[:, None] * N + ns[None, :]
    # W[e] is [N, K] (any strides): a [BLOCK_N, BLOCK_K] tile
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + ns[:, None].to(tl.int64) * stride_wn
              + cols[None, :] * stride_wk)

    w_row = (expert * N).to(tl.int32)                # TMA row of W viewed [E*N, K]
    dy_row = (expert_start + local_row).to(tl.int32)  # TMA row of dY [M, N]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        if EVEN_N:
            n_mask = ns < BLOCK_N
        else:
            n_mask = (n0 + ns) < N
        if TMA_DY:
            dy = dy_desc.load([dy_row, n0])
            if not EVEN_N:  # columns past N must be zero: they meet the next expert's W
                dy = tl.where(n_mask[None, :], dy, 0.0)
        else:
            dy = tl.load(dy_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if TMA_W:
            w = w_desc.load([w_row + n0, k_tile * BLOCK_K])
            if not EVEN_N:
                w = tl.where(n_mask[:, None], w, 0.0)
        else:
            w = tl.load(w_ptrs, mask=n_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(dy.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif IEEE_DOT:
            acc = tl.dot(dy, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w, acc)
        dy_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn

    out_rows = routed if PERMUTE_X else pos
    tl.store(dx_ptr + out_rows[:, None] * K + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def launch_dx(dy, w, m_sizes, gather_indices, dx, *, permute_x, permute_y, config):
    """Run the dX kernel into the preallocated dx [M, K]. dy [M, N], w [E, N, K]."""
    num_experts, n, k = w.shape
    m = dx.shape[0]
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    num_m_tiles = triton.cdiv(m, config.block_m) + num_experts
    grid = (num_m_tiles * triton.cdiv(k, config.block_k),)
    w2d = weights_2d(w)
    tma_w = config.tma_load_w and w2d is not None and tma_usable(w2d, config.block_k)
    tma_dy = config.tma_load_dy and not permute_y and tma_usable(dy, config.block_n)
    _dx_kernel[grid](
        dy, w,
        descriptor_2d(dy, config.block_m, config.block_n) if tma_dy else None,
        descriptor_2d(w2d, config.block_n, config.block_k) if tma_w else None,
        dx, m_sizes, gather_indices if gather_indices is not None else m_sizes,
        num_experts, m, n, k, num_m_tiles, *w.stride(),
        PERMUTE_X=permute_x, PERMUTE_Y=permute_y, TMA_W=tma_w, TMA_DY=tma_dy,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, E_POW2=next_pow2(num_experts), EVEN_N=n % config.block_n == 0,
        UPCAST_DOT=INTERPRETING and dy.dtype != torch.float32,
        IEEE_DOT=dy.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dx
