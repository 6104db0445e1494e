"""Routing on the device in three launches: m_sizes, gather (stable argsort of the expert ids)
and pos (its inverse) from topk_ids [T, k], without a host sync and with static shapes
(CUDA-graph safe).

Routed row r = t*k + j carries the id topk_ids[t, j]. Ids outside [0, E) are "invalid": they
count for no expert and sort after every expert's rows (as if their id were E). The rows are
cut into blocks of BLOCK rows, and EB = next power of two >= E:

1. count:   counts[b, e] = rows of block b with id e (a histogram per block, over the valid
            ids only, so E = 128 takes 128 bins, not 256).
2. scan:    before[b, e] = rows with id e in blocks < b (what keeps the order stable across
            blocks), and m_sizes[e] = all rows with id e. A column scan: bins are independent,
            so the programs split the bins and each walks down the blocks.
3. scatter: each block sorts its keys id * BLOCK + local_row (unique keys, so the order is
            stable; invalid rows take the id E). The sorted element j with id e is the
            (j - below[b, e])-th row of id e in its block, below[b, e] = rows of block b with
            ids < e, so its expert-order position is
                p = start[e] + before[b, e] + j - below[b, e],   start[e] = rows with ids < e.
            Invalid rows (id E) start after all valid rows, sum(m_sizes), plus the invalid
            rows of blocks < b (b * BLOCK minus their valid rows) and rank below the block's
            valid rows. pos[row] = p and gather[p] = row.

Padding lanes past M (in the last block) are left out of the histogram and get the id E + 1:
they sort after every real row, do not move any rank and store nothing.
"""

import torch
import triton
import triton.language as tl

from triton_gg._runtime import INTERPRETING
from triton_gg.kernels.schedule import next_pow2

# Rows per block: the scatter kernel sorts BLOCK keys in registers (bitonic: log2(BLOCK) *
# (log2(BLOCK) + 1) / 2 exchange steps, a chain of latency). Smaller blocks give more
# programs and shorter chains, larger ones fewer rows to scan: a block is chosen so that
# about TARGET_PROGRAMS programs run (an H100/H200 has 132 SMs), within these bounds.
MIN_BLOCK, MAX_BLOCK, TARGET_PROGRAMS = 128, 1024, 128
# Under the Triton interpreter (CPU) a program and a sort step cost about the same whatever
# their size: fewer, larger blocks (T=2500, k=8 routes in 0.6 s instead of 3.5 s).
INTERPRETER_BLOCK = 4096
# Bins of one scan program (fewer: more programs, each walking all blocks), and elements of
# its [rows, bins] tile.
SCAN_BINS, SCAN_TILE = 16, 4096
# Bins of the histograms (E rounded up to a power of two): beyond this the scatter kernel's
# per-bin vectors outgrow the registers; routing.route falls back to torch ops there.
MAX_BINS = 4096


@triton.jit
def _load_ids(ids_ptr, b, M, TOPK, stride_t, stride_k, E, BLOCK: tl.constexpr):
    """Ids of block b's rows as int32 (invalid ones as E), and the masks of real rows (not
    padding) and of valid ids. ids are read in their own dtype (int32, int64, ...) at any
    strides: no copy, no conversion kernel."""
    rows = b * BLOCK + tl.arange(0, BLOCK)
    real = rows < M
    ids = tl.load(ids_ptr + (rows // TOPK).to(tl.int64) * stride_t + (rows % TOPK) * stride_k,
                  mask=real, other=0)
    valid = (ids >= 0) & (ids < E)  # compared in the ids' own dtype (no int64 truncation)
    return tl.where(valid, ids, E).to(tl.int32), real, real & valid


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, M, TOPK, stride_t, stride_k, E,
                  BLOCK: tl.constexpr, EB: tl.constexpr):
    b = tl.program_id(0)
    ids, _, valid = _load_ids(ids_ptr, b, M, TOPK, stride_t, stride_k, E, BLOCK)
    row = b.to(tl.int64) * EB  # num_blocks * EB may pass 2**31 (scratch of huge M, E)
    tl.store(counts_ptr + row + tl.arange(0, EB), tl.histogram(ids, EB, mask=valid))


@triton.jit
def _scan_kernel(counts_ptr, before_ptr, m_sizes_ptr, num_blocks, E,
                 EB: tl.constexpr, BINS: tl.constexpr, ROWS: tl.constexpr):
    """Bins [pid * BINS, +BINS): before[b, e] (exclusive prefix down the blocks) and
    m_sizes[e], ROWS blocks per step with a running sum carried between steps."""
    bins = tl.program_id(0) * BINS + tl.arange(0, BINS)
    rows = tl.arange(0, ROWS)
    done = tl.zeros([BINS], dtype=tl.int32)
    for first in range(0, num_blocks, ROWS):
        blocks = first + rows
        at = blocks.to(tl.int64)[:, None] * EB + bins[None, :]
        in_range = (blocks < num_blocks)[:, None]
        tile = tl.load(counts_ptr + at, mask=in_range, other=0)
        tl.store(before_ptr + at, done[None, :] + tl.cumsum(tile, axis=0) - tile,
                 mask=in_range)
        done += tl.sum(tile, axis=0)
    tl.store(m_sizes_ptr + bins, done, mask=bins < E)


@triton.jit
def _sort(keys, LOG_N: tl.constexpr):
    """Ascending bitonic sort of 2**LOG_N distinct int32 keys below 2**30.

    Viewed as a [2] * LOG_N hypercube, axis LOG_N - 1 - b of the view runs over bit b of the
    element index, so an element's partner in an exchange over bit b (the index differing in
    that bit) is the other entry along that axis: the sum over the axis minus the element.
    (tl.sort finds it with an xor reduction, which the Triton interpreter runs element by
    element in Python, seconds per block; a sum runs in NumPy there, and on the GPU it is a
    little faster than tl.sort.) The index bits are [1, .., 2, .., 1] aranges inlined here:
    a nested jit call costs the interpreter a re-patch of triton.language each time."""
    h = tl.reshape(keys, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):  # merge runs of 2**stage elements
        # runs alternate ascending / descending (bit `stage` of the index); the last stage
        # sorts everything ascending
        if stage < LOG_N:
            descending = tl.reshape(tl.arange(0, 2),
                                    [1] * (LOG_N - 1 - stage) + [2] + [1] * stage)
        else:
            descending = tl.zeros([1] * LOG_N, dtype=tl.int32)
        for i in tl.static_range(stage):
            # partners differ in bit stage - 1 - i of the index: axis LOG_N - stage + i
            upper = tl.reshape(tl.arange(0, 2),
                               [1] * (LOG_N - stage + i) + [2] + [1] * (stage - 1 - i))
            partner = tl.sum(h, axis=LOG_N - stage + i, keep_dims=True) - h
            # an ascending pair puts the larger key on the upper index, a descending the lower
            h = tl.where((h > partner) == ((upper ^ descending) != 0), h, partner)
    return tl.reshape(h, [2**LOG_N])


@triton.jit
def _scatter_kernel(ids_ptr, counts_ptr, before_ptr, m_sizes_ptr, gather_ptr, pos_ptr, M,
                    TOPK, stride_t, stride_k, E, BLOCK: tl.constexpr, EB: tl.constexpr,
                    LOG_BLOCK: tl.constexpr):
    b = tl.program_id(0)
    # per id e: base[e] = start[e] + before[b, e] - below[b, e] (module docstring)
    experts = tl.arange(0, EB)
    m_sizes = tl.load(m_sizes_ptr + experts, mask=experts < E, other=0)
    row = b.to(tl.int64) * EB
    counts = tl.load(counts_ptr + row + experts)
    before = tl.load(before_ptr + row + experts)
    start = tl.cumsum(m_sizes, axis=0) - m_sizes
    base = start + before - (tl.cumsum(counts, axis=0) - counts)
    # invalid rows: after every valid row and the invalid rows of blocks < b (full blocks),
    # ranked below the block's valid rows
    base_invalid = tl.sum(m_sizes, axis=0) + (b * BLOCK - tl.sum(before, axis=0)) - tl.sum(
        counts, axis=0)

    ids, real, _ = _load_ids(ids_ptr, b, M, TOPK, stride_t, stride_k, E, BLOCK)
    local = tl.arange(0, BLOCK)
    ids = tl.where(real, ids, E + 1)  # padding: after every real row
    keys = _sort((ids << LOG_BLOCK) | local, LOG_BLOCK)  # unique keys: a stable order
    sorted_ids = keys >> LOG_BLOCK
    sorted_rows = b * BLOCK + (keys & (BLOCK - 1))
    keep = sorted_ids <= E
    # the sorted index is the rank within the block
    p = tl.where(sorted_ids < E, tl.gather(base, tl.minimum(sorted_ids, EB - 1), 0),
                 base_invalid) + local
    tl.store(pos_ptr + sorted_rows, p, mask=keep)
    tl.store(gather_ptr + p, sorted_rows, mask=keep)


def default_block(routed: int) -> int:
    if INTERPRETING:  # the interpreter's cost is per program and per sort step, not per row
        return min(INTERPRETER_BLOCK, max(16, next_pow2(routed)))
    return min(MAX_BLOCK, max(MIN_BLOCK, next_pow2(triton.cdiv(routed, TARGET_PROGRAMS))))


def launch_route(topk_ids: torch.Tensor, num_experts: int, *, block: int | None = None):
    """(m_sizes int32 [E], gather int32 [M], pos int32 [M]) for topk_ids [T, k] (any integer
    dtype and strides), M = T*k, on topk_ids' device. gather is the stable argsort of the
    row-major flattened ids with ids outside [0, E) sorted last; pos[gather[p]] = p.
    block: rows per program (a power of two; default: default_block(M))."""
    tokens, topk = topk_ids.shape
    routed = tokens * topk
    device = topk_ids.device
    gather = torch.empty(routed, dtype=torch.int32, device=device)
    pos = torch.empty(routed, dtype=torch.int32, device=device)
    if routed == 0:
        return torch.zeros(num_experts, dtype=torch.int32, device=device), gather, pos
    if routed >= 2**31:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} routes {routed} rows; the int32 "
                         f"gather indices hold fewer than 2**31")
    bins = next_pow2(num_experts)
    if bins > MAX_BINS:
        raise ValueError(f"num_experts={num_experts}: the routing kernels take at most "
                         f"{MAX_BINS} experts")
    block = block or default_block(routed)
    if block < 2 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 2, got {block}")
    if (num_experts + 2) * block > 2**30:  # sort keys id * BLOCK + row stay below 2**30
        raise ValueError(f"block={block} with num_experts={num_experts}: the sort keys "
                         f"(num_experts + 2) * block must stay below 2**30")
    num_blocks = triton.cdiv(routed, block)
    m_sizes = torch.empty(num_experts, dtype=torch.int32, device=device)  # the scan writes it
    scratch = torch.empty((2, num_blocks, bins), dtype=torch.int32, device=device)
    counts, before = scratch[0], scratch[1]
    stride_t, stride_k = topk_ids.stride()
    scan_bins = min(bins, SCAN_BINS)
    warps = 8 if block >= 1024 else 4  # H200: 1024-row sorts ran 20-30 % faster on 8 warps
    _count_kernel[(num_blocks,)](topk_ids, counts, routed, topk, stride_t, stride_k,
                                 num_experts, BLOCK=block, EB=bins, num_warps=warps)
    _scan_kernel[(bins // scan_bins,)](counts, before, m_sizes, num_blocks, num_experts,
                                       EB=bins, BINS=scan_bins,
                                       ROWS=max(1, SCAN_TILE // scan_bins), num_warps=4)
    _scatter_kernel[(num_blocks,)](topk_ids, counts, before, m_sizes, gather, pos, routed,
                                   topk, stride_t, stride_k, num_experts, BLOCK=block,
                                   EB=bins, LOG_BLOCK=block.bit_length() - 1,
                                   num_warps=warps)
    return m_sizes, gather, pos
