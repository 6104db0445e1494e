"""Forward grouped GEMM: Y[p] = X[row(p)] @ W[e(p)].T, with the MoE fusions.

* permute_x: X is [T, K] in token order; row p is read at gather[p] // topk (gather fused
  into the load; no permuted copy of X exists).
* permute_y: row p is stored at gather[p] (scatter fused into the store).
* fuse_mul_post: each row is scaled by topk_weights[gather[p]] in the epilogue; with
  STORE_UNWEIGHTED the unscaled row is also stored (the autograd op needs it for the
  gradient of the routing weights).

Persistent grid: one program (or two, see ``schedule.programs_for``) per SM walks the output
tiles tile, tile + programs, ... The tile loop and the K loop form one flattened loop
(``tl.range(..., flatten=True)``), so Triton's software pipeliner issues the next tile's
first loads while the current tile's epilogue runs. A one-tile-per-program grid paid every
tile's pipeline fill and whole epilogue with the tensor cores idle: with 128 x 256 tiles
one program fills an SM's shared memory. Measured on the H200 by the tuner (do_bench, best
config each; benchmarks/NOTES.md, step 13): 0.411 -> 0.369 ms where the K loop is short
(qwen3_w2, K = 768), 2.45 -> 2.09 ms at llama4_w1 (mostly the tile order below), within
2% at qwen3_w1 and gptoss_w1.

The schedule comes from ``m_sizes`` alone: per-expert tile counts and row starts are
computed once per program (a prefix sum over the experts, held in registers), and a few
reductions per tile find its expert. The tile count is exact, so no program visits a
padding tile, and the kernel runs on any contiguous range of experts (expert parallelism
passes the local ``m_sizes``). Tiles are visited in groups of GROUP_M M-tiles per N column
(W tiles shared in L2: at llama4_w1 one expert's W is 168 MB, and a row-major order read it
once per M-tile).

N and K are compile-time constants: one compilation per weight shape (a model has a few),
static strides and K-loop trip counts (see benchmarks/NOTES.md, step 4). M and the routing
stay runtime values, so token counts never recompile.
"""

import torch
import triton
import triton.language as tl

from triton_gg._runtime import INTERPRETING
from triton_gg.kernels.schedule import (clamp_index, expert_tile_table, find_m_tile,
                                        next_pow2, programs_for, swizzle)
from triton_gg.kernels.tma import descriptor_2d, tma_usable, weights_2d


@triton.jit(do_not_specialize=["M"])
def _forward_kernel(
    x_ptr, w_ptr, x_desc, w_desc, y_ptr, y_unweighted_ptr, m_sizes_ptr, gather_ptr,
    topk_weights_ptr, E, M, N: tl.constexpr, K: tl.constexpr, TOPK, num_programs,
    stride_we, stride_wn, stride_wk,
    PERMUTE_X: tl.constexpr, PERMUTE_Y: tl.constexpr, FUSE_MUL: tl.constexpr,
    STORE_UNWEIGHTED: tl.constexpr, TMA_W: tl.constexpr, TMA_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, E_POW2: tl.constexpr, EVEN_K: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    # M: the rows of Y (and of gather, topk_weights; of X unless permute_x). The schedule
    # never reaches past them, whatever m_sizes holds (``safe_sizes``).
    experts, sizes, tiles, tiles_end, starts, num_m_tiles = expert_tile_table(
        m_sizes_ptr, E, M, BLOCK_M, E_POW2)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m_tiles * num_n_tiles
    ks = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True,
                         warp_specialize=WARP_SPECIALIZE):
        m_tile, n_tile = swizzle(tile, num_m_tiles, num_n_tiles, GROUP_M)
        expert, expert_start, expert_rows, local_row = find_m_tile(
            m_tile, experts, sizes, tiles, tiles_end, starts, BLOCK_M)

        rows = local_row + tl.arange(0, BLOCK_M)
        row_mask = rows < expert_rows
        pos = expert_start + rows  # expert-order positions (int64)
        if PERMUTE_X or PERMUTE_Y or FUSE_MUL:
            # clamped into [0, M): an index outside would address Y (permute_y) or
            # topk_weights [M] past their ends, or X [M / topk, K] (permute_x) through
            # index // topk
            routed = clamp_index(tl.load(gather_ptr + pos, mask=row_mask, other=0), M)
            routed = routed.to(tl.int64)
        if PERMUTE_X:
            x_rows = routed // TOPK
        else:
            x_rows = pos
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        x_ptrs = x_ptr + x_rows[:, None] * K + ks[None, :]
        w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we
                  + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk)
        w_row = (expert * N + n_tile * BLOCK_N).to(tl.int32)  # TMA row of W as [E*N, K]
        x_row = (expert_start + local_row).to(tl.int32)       # TMA row of X [M, K]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                k_mask = ks < BLOCK_K
            else:
                k_mask = (k0 + ks) < K
            if TMA_X:
                x = x_desc.load([x_row, k0])
            else:
                x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if TMA_W:
                w = w_desc.load([w_row, k0]).T
            else:
                w = tl.load(w_ptrs, mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            if UPCAST_DOT:  # the interpreter's bf16 dot multiplies bit patterns
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            elif IEEE_DOT:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk

        out_rows = routed if PERMUTE_Y else pos
        out_offsets = out_rows[:, None] * N + cols[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        if FUSE_MUL:
            if STORE_UNWEIGHTED:
                tl.store(y_unweighted_ptr + out_offsets, acc.to(y_ptr.dtype.element_ty),
                         mask=out_mask)
            scale = tl.load(topk_weights_ptr + routed, mask=row_mask, other=0.0).to(tl.float32)
            acc = acc * scale[:, None]
        tl.store(y_ptr + out_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def launch_forward(x, w, m_sizes, gather_indices, topk_weights, y, y_unweighted, *, topk,
                   permute_x, permute_y, fuse_mul_post, store_unweighted, config,
                   programs=None):
    """Run the forward kernel into the preallocated y (and y_unweighted). Arguments are
    already validated; shapes: x [M or T, K], w [E, N, K], y [M, N]. ``programs``
    overrides the persistent grid size (tests use it to vary the tile striding)."""
    num_experts, n, k = w.shape
    m = y.shape[0]
    if m == 0 or n == 0:
        return y
    programs = programs or programs_for(y.device, config, x.element_size(),
                                        (config.block_m + config.block_n) * config.block_k)
    placeholder = m_sizes  # stands in for pointers a variant does not read
    w2d = weights_2d(w)
    tma_w = config.tma_load_w and w2d is not None and tma_usable(w2d, config.block_k)
    tma_x = config.tma_load_x and not permute_x and tma_usable(x, config.block_k)
    _forward_kernel[(programs,)](
        x, w,
        descriptor_2d(x, config.block_m, config.block_k) if tma_x else None,
        descriptor_2d(w2d, config.block_n, config.block_k) if tma_w else None,
        y, y_unweighted if store_unweighted else y, m_sizes,
        gather_indices if gather_indices is not None else placeholder,
        topk_weights if fuse_mul_post else placeholder,
        num_experts, m, n, k, topk, programs, *w.stride(),
        PERMUTE_X=permute_x, PERMUTE_Y=permute_y, FUSE_MUL=fuse_mul_post,
        STORE_UNWEIGHTED=store_unweighted and fuse_mul_post, TMA_W=tma_w, TMA_X=tma_x,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, E_POW2=next_pow2(num_experts), EVEN_K=k % config.block_k == 0,
        WARP_SPECIALIZE=config.warp_specialize and not INTERPRETING,
        UPCAST_DOT=INTERPRETING and x.dtype != torch.float32,
        IEEE_DOT=x.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y
