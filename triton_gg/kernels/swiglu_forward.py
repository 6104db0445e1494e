"""The first GEMM of a gated MoE MLP with SiLU-gating in its epilogue.

    H[p] = X[row(p)] @ W[e(p)].T          W[e] = [gate rows (I); up rows (I)], H [M, 2I]
    A[p] = silu(H[p, :I]) * H[p, I:]                                            A [M, I]

Each program owns BLOCK_N / 2 columns j of the gate half and the same columns I + j of the up
half (two accumulators, the registers of one BLOCK_M x BLOCK_N tile), so the epilogue holds
both factors of A and writes H (kept for the backward) and A in one pass: no separate
activation kernels reading H back. permute_x gathers X rows at gather[p] // topk as the plain
forward does; outputs stay in expert order.
"""

import torch
import triton
import triton.language as tl

from triton_gg._runtime import INTERPRETING
from triton_gg.kernels.forward import next_pow2
from triton_gg.kernels.schedule import locate_m_tile, swizzle
from triton_gg.kernels.tma import descriptor_2d, tma_usable, weights_2d


@triton.jit
def _swiglu_forward_kernel(
    x_ptr, w_ptr, w_desc, h_ptr, a_ptr, m_sizes_ptr, gather_ptr,
    E, I: tl.constexpr, K: tl.constexpr, num_m_tiles, TOPK,
    stride_we, stride_wn, stride_wk,
    PERMUTE_X: tl.constexpr, TMA_W: tl.constexpr,
    BLOCK_M: tl.constexpr, HALF_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, E_POW2: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    num_n_tiles = tl.cdiv(I, HALF_N)
    m_tile, n_tile = swizzle(tl.program_id(0), num_m_tiles, num_n_tiles, GROUP_M)
    expert, expert_start, expert_rows, local_row = locate_m_tile(
        m_tile, m_sizes_ptr, E, BLOCK_M, E_POW2)
    if expert >= E:
        return

    rows = local_row + tl.arange(0, BLOCK_M)
    row_mask = rows < expert_rows
    pos = expert_start + rows
    if PERMUTE_X:
        routed = tl.load(gather_ptr + pos, mask=row_mask, other=0).to(tl.int64)
        x_rows = routed // TOPK
    else:
        x_rows = pos

    cols = n_tile * HALF_N + tl.arange(0, HALF_N)  # columns of the gate half (and of A)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + x_rows[:, None] * K + ks[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk
    wg_ptrs = w_base + cols[None, :].to(tl.int64) * stride_wn
    wu_ptrs = w_base + (cols[None, :] + I).to(tl.int64) * stride_wn
    gate_row = (expert * 2 * I + n_tile * HALF_N).to(tl.int32)  # TMA rows of W as [E*2I, K]

    acc_g = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, HALF_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            k_mask = ks < BLOCK_K
        else:
            k_mask = (k0 + ks) < K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if TMA_W:
            wg = w_desc.load([gate_row, k0]).T
            wu = w_desc.load([gate_row + I, k0]).T
        else:
            w_mask = col_mask[None, :] & k_mask[:, None]
            wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
            wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
        if UPCAST_DOT:  # the interpreter's bf16 dot multiplies bit patterns
            xf = x.to(tl.float32)
            acc_g = tl.dot(xf, wg.to(tl.float32), acc_g, input_precision="ieee")
            acc_u = tl.dot(xf, wu.to(tl.float32), acc_u, input_precision="ieee")
        elif IEEE_DOT:
            acc_g = tl.dot(x, wg, acc_g, input_precision="ieee")
            acc_u = tl.dot(x, wu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(x, wg, acc_g)
            acc_u = tl.dot(x, wu, acc_u)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk

    out_ty = h_ptr.dtype.element_ty
    # A from the rounded H: the backward differentiates the stored H, so A must be its
    # function (one rounding of silu(gate) * up, fp32 inside)
    gate = acc_g.to(out_ty)
    up = acc_u.to(out_ty)
    mask = row_mask[:, None] & col_mask[None, :]
    h_offsets = pos[:, None] * (2 * I) + cols[None, :]
    tl.store(h_ptr + h_offsets, gate, mask=mask)
    tl.store(h_ptr + h_offsets + I, up, mask=mask)
    g = gate.to(tl.float32)
    a = g * tl.sigmoid(g) * up.to(tl.float32)
    tl.store(a_ptr + pos[:, None] * I + cols[None, :], a.to(out_ty), mask=mask)


def launch_swiglu_forward(x, w, m_sizes, gather_indices, h, a, *, topk, permute_x, config):
    """Run the kernel into the preallocated h [M, 2I] and a [M, I]. x [M or T, K],
    w [E, 2I, K] (any strides); config.block_n spans both halves (each BLOCK_N / 2 wide)."""
    num_experts, two_i, k = w.shape
    inter = two_i // 2
    m = h.shape[0]
    if m == 0 or inter == 0:
        return h, a
    half_n = config.block_n // 2
    num_m_tiles = triton.cdiv(m, config.block_m) + num_experts
    grid = (num_m_tiles * triton.cdiv(inter, half_n),)
    w2d = weights_2d(w)
    tma_w = config.tma_load_w and w2d is not None and tma_usable(w2d, config.block_k)
    _swiglu_forward_kernel[grid](
        x, w, descriptor_2d(w2d, half_n, config.block_k) if tma_w else None, h, a, m_sizes,
        gather_indices if gather_indices is not None else m_sizes,
        num_experts, inter, k, num_m_tiles, topk, *w.stride(),
        PERMUTE_X=permute_x, TMA_W=tma_w,
        BLOCK_M=config.block_m, HALF_N=half_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, E_POW2=next_pow2(num_experts),
        EVEN_K=k % config.block_k == 0,
        UPCAST_DOT=INTERPRETING and x.dtype != torch.float32,
        IEEE_DOT=x.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return h, a
