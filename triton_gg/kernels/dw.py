"""dW grouped GEMM: dW[e] = sum over the expert's rows p of dY[row(p)]^T X[row(p)].

Work is decomposed over (expert, N-tile, K-tile): every program owns one output tile of one
expert and reduces over that expert's rows only, so no program walks every expert (the
seed's design, 0.27x of torch._grouped_mm's backward) and no atomics are needed (the result is
deterministic). An expert with no rows runs zero iterations and stores exact zeros.
* permute_x: X is [T, K] in token order, read at gather[p] // topk.
* permute_y: dY is in routed-row order, read at gather[p].
N and K are compile-time constants, as in the forward and dX kernels (one compilation per
weight shape; a model has few): static row strides and trip counts measured 10-45% faster
than runtime N and K on the H200 (benchmarks/NOTES.md, step 4).

Persistent grid: a program per SM (two where two sets of buffers fit) strides over the
output tiles. An expert's reduction is short (~512 rows at qwen3 shapes: 8 steps of 64),
so one tile per program spent much of its time filling the pipeline and storing. The tile
loop asks Triton to flatten the row loop into it (as in ``forward.py``), but the row
loop's trip count is the expert's row count, and Triton 3.6 keeps the two loops: compiled
for sm_90 the kernel has two ``scf.for`` against the forward's one
(``benchmarks/compile_check.py``), so the next tile's loads do not overlap this tile's
epilogue (benchmarks/NOTES.md, step 15).

``tma_load_x`` / ``tma_load_dy``: each tile reads its expert's rows through descriptors
built in the kernel over those rows only (``tl.make_tensor_descriptor``, base at the
expert's first row): rows past the expert's end read as zeros, and the tiles go from
shared memory straight into the MMA. Measured on the H200 (step 15): gptoss_w1 2.145 ->
1.967 ms, slower at the qwen3 shapes; the tuner picks per shape.

``tma_store_dw``: the output tile goes registers -> shared memory -> the TMA engine (dW
viewed [E, N, K], so the engine clips each tile at N and K inside its expert), and the
copy runs on while the next tile's MMAs start; with pointer stores the warps issue the
whole 32-64 KB tile themselves before they can. Measured on the H200 (benchmarks/NOTES.md,
step 14): 0.950 -> 0.850 ms at qwen3_w1 with the tuned tile. The staged tile takes shared
memory (``programs_for`` counts it), so some one-warpgroup tiles no longer fit twice per
SM with it.
"""

import torch
import triton
import triton.language as tl

from triton_gg._runtime import INTERPRETING
from triton_gg.kernels.schedule import clamp_index, next_pow2, programs_for, safe_sizes
from triton_gg.kernels.tma import descriptor, ensure_device_descriptor_scratch, tma_usable


@triton.jit(do_not_specialize=["M"])
def _dw_kernel(
    x_ptr, dy_ptr, dw_ptr, dw_desc, m_sizes_ptr, gather_ptr,
    E, M, N: tl.constexpr, K: tl.constexpr, TOPK, num_programs, stride_de, stride_dn,
    stride_dk,
    PERMUTE_X: tl.constexpr, PERMUTE_Y: tl.constexpr, TMA_X: tl.constexpr,
    TMA_DY: tl.constexpr, TMA_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    E_POW2: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    # M: the rows of dY and gather (and of X unless permute_x). Each expert's row range
    # (which also bounds its TMA descriptors) is cut to them, whatever m_sizes holds
    experts, sizes, starts = safe_sizes(m_sizes_ptr, E, M, E_POW2)
    for tile in tl.range(tl.program_id(0), E * num_n_tiles * num_k_tiles, num_programs,
                         flatten=True):
        # consecutive tiles share an expert (its rows stay in L2), then an N-tile
        expert = tile // (num_n_tiles * num_k_tiles)
        n_tile = (tile // num_k_tiles) % num_n_tiles
        k_tile = tile % num_k_tiles
        this = experts == expert
        expert_start = tl.sum(tl.where(this, starts, 0), 0)
        expert_rows = tl.sum(tl.where(this, sizes, 0), 0)
        _dw_tile(x_ptr, dy_ptr, dw_ptr, dw_desc, gather_ptr, expert,
                 expert_start, expert_rows, n_tile, k_tile, M, N, K, TOPK, stride_de,
                 stride_dn, stride_dk, PERMUTE_X, PERMUTE_Y, TMA_X, TMA_DY, TMA_DW, BLOCK_M,
                 BLOCK_N, BLOCK_K, UPCAST_DOT, IEEE_DOT)


@triton.jit
def _dw_tile(x_ptr, dy_ptr, dw_ptr, dw_desc, gather_ptr, expert,
             expert_start, expert_rows, n_tile, k_tile, M, N: tl.constexpr, K: tl.constexpr,
             TOPK,
             stride_de, stride_dn, stride_dk, PERMUTE_X: tl.constexpr,
             PERMUTE_Y: tl.constexpr, TMA_X: tl.constexpr, TMA_DY: tl.constexpr,
             TMA_DW: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr):
    """One [BLOCK_N, BLOCK_K] tile of dW[expert], reduced over the expert's rows."""
    ns = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = ns < N
    k_mask = ks < K
    ms = tl.arange(0, BLOCK_M)

    if TMA_DY:  # this expert's rows of dY [M, N] (at least one row: a valid descriptor)
        dy_desc = tl.make_tensor_descriptor(dy_ptr + expert_start * N,
                                            shape=[tl.maximum(expert_rows, 1), N],
                                            strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    if TMA_X:
        x_desc = tl.make_tensor_descriptor(x_ptr + expert_start * K,
                                           shape=[tl.maximum(expert_rows, 1), K],
                                           strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, expert_rows, BLOCK_M):
        row_mask = (m0 + ms) < expert_rows
        pos = expert_start + m0 + ms
        if PERMUTE_X or PERMUTE_Y:
            # clamped into [0, M): an index outside would address X or dY past their ends
            routed = clamp_index(tl.load(gather_ptr + pos, mask=row_mask, other=0), M)
            routed = routed.to(tl.int64)
        x_rows = routed // TOPK if PERMUTE_X else pos
        dy_rows = routed if PERMUTE_Y else pos
        # dY tile [BLOCK_M, BLOCK_N] and X tile [BLOCK_M, BLOCK_K], both row-major loads
        # (16-byte vectors along the contiguous dimension); the MMA reads dY transposed.
        # TMA tiles come through this expert's own descriptors (rows past its end read as
        # zeros: the next expert's rows must not enter the sum), straight into the MMA.
        if TMA_DY:
            dy = dy_desc.load([m0, n_tile * BLOCK_N])
        else:
            dy = tl.load(dy_ptr + dy_rows[:, None] * N + ns[None, :],
                         mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if TMA_X:
            x = x_desc.load([m0, k_tile * BLOCK_K])
        else:
            x = tl.load(x_ptr + x_rows[:, None] * K + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(tl.trans(dy.to(tl.float32)), x.to(tl.float32), acc,
                         input_precision="ieee")
        elif IEEE_DOT:
            acc = tl.dot(tl.trans(dy), x, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(dy), x, acc)

    if TMA_DW:
        # dW as [E, N, K]: the engine clips the tile at N and K within this expert, and
        # the shared -> global copy runs on while the next tile's MMAs start
        tile = tl.reshape(acc.to(dw_ptr.dtype.element_ty), (1, BLOCK_N, BLOCK_K))
        dw_desc.store([expert, n_tile * BLOCK_N, k_tile * BLOCK_K], tile)
    else:
        # dW[e] is [N, K] (any strides: grouped_mm writes a transposed [E, K, N] view)
        out = (dw_ptr + expert.to(tl.int64) * stride_de
               + ns[:, None].to(tl.int64) * stride_dn + ks[None, :] * stride_dk)
        tl.store(out, acc.to(dw_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & k_mask[None, :])


def launch_dw(x, dy, m_sizes, gather_indices, dw, *, topk, permute_x, permute_y, config,
              programs=None):
    """Run the dW kernel into the preallocated dw [E, N, K]. Persistent grid
    (``programs`` overrides its size; the number of output tiles gives one tile per
    program)."""
    num_experts, n, k = dw.shape
    if dw.numel() == 0:
        return dw
    # the kernel's per-expert descriptors take rows of exactly K (N) elements
    tma_x = (config.tma_load_x and not permute_x and x.stride() == (k, 1)
             and tma_usable(x, config.block_k))
    tma_dy = (config.tma_load_dy and not permute_y and dy.stride() == (n, 1)
              and tma_usable(dy, config.block_n))
    tma_dw = config.tma_store_dw and dw.is_contiguous() and tma_usable(dw, config.block_k)
    programs = programs or programs_for(dw.device, config, x.element_size(),
                                        config.block_m * (config.block_n + config.block_k),
                                        config.block_n * config.block_k if tma_dw else 0)
    if (tma_x or tma_dy) and dw.is_cuda:
        ensure_device_descriptor_scratch()
    _dw_kernel[(programs,)](
        x, dy, dw, descriptor(dw, (1, config.block_n, config.block_k)) if tma_dw else None,
        m_sizes, gather_indices if gather_indices is not None else m_sizes,
        num_experts, dy.shape[0], n, k, topk, programs, *dw.stride(),
        PERMUTE_X=permute_x, PERMUTE_Y=permute_y, TMA_X=tma_x, TMA_DY=tma_dy, TMA_DW=tma_dw,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        E_POW2=next_pow2(num_experts),
        UPCAST_DOT=INTERPRETING and x.dtype != torch.float32,
        IEEE_DOT=x.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return dw
