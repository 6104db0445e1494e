"""The work schedule, computed inside the kernels from ``m_sizes`` alone.

Forward and dX tile the routed rows expert by expert: expert e contributes
``cdiv(m_sizes[e], BLOCK_M)`` M-tiles. dX (one program per tile) launches an upper bound of
``cdiv(M, BLOCK_M) + E`` programs (no host sync to learn the exact count) and each finds its
expert with ``locate_m_tile``. The persistent kernels (forward, dW) launch ``programs_for``
programs, build the per-expert table once per program (``expert_tile_table``: the exact tile
count) and look each visited tile up in it (``find_m_tile``). Either way the prefix sum over
the experts is a handful of vector instructions, cheaper than a separate launch that builds
a tile table, and every kernel stays launchable on any contiguous range of experts (expert
parallelism just passes the local ``m_sizes``).
"""

import torch
import triton
import triton.language as tl


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): register vectors over the experts."""
    return 1 << max(0, (max(1, n) - 1).bit_length())


@triton.jit
def safe_sizes(m_sizes_ptr, E, M, E_POW2: tl.constexpr):
    """(expert ids, row counts (int32), first expert-order row of each expert (int64)) with
    the routing cut to the M rows that the tensors hold.

    Kernels are memory-safe for any routing values (value checks are off by default): a
    negative size counts as zero and the experts' row ranges are clipped at M, so no
    position reaches past the arrays, however wrong m_sizes is (a sum past M, a negative
    size, int32 sums that would overflow). For valid routing (sizes >= 0, sum <= M) this is
    the identity. A few vector ops over the experts, once per program."""
    experts = tl.arange(0, E_POW2)
    raw = tl.load(m_sizes_ptr + experts, mask=experts < E, other=0).to(tl.int64)
    sizes = tl.minimum(tl.maximum(raw, 0), M)  # each in [0, M]: the int64 sum cannot wrap
    ends = tl.cumsum(sizes, 0)
    starts = tl.minimum(ends - sizes, M)
    ends = tl.minimum(ends, M)
    return experts, (ends - starts).to(tl.int32), starts


@triton.jit
def locate_m_tile(tile, m_sizes_ptr, E, M, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """For M-tile number `tile`: (expert, first expert-order row of the expert, the expert's
    row count, first row of this tile within the expert). expert == E marks a padding tile
    past the last real one. Sizes as ``safe_sizes`` (cut to the M rows of the tensors)."""
    experts, sizes, starts = safe_sizes(m_sizes_ptr, E, M, E_POW2)
    tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)  # inclusive: tiles of experts 0..e
    expert = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    this = experts == expert
    first_tile = tl.sum(tl.where(this, tiles_end - tiles, 0), 0)
    expert_start = tl.sum(tl.where(this, starts, 0), 0)
    expert_rows = tl.sum(tl.where(this, sizes, 0), 0)
    return expert, expert_start, expert_rows, (tile - first_tile) * BLOCK_M


@triton.jit
def swizzle(pid, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    """Program id -> (M-tile, N-tile), visiting GROUP_M M-tiles per N column so that
    programs running together share operand tiles in L2."""
    per_group = GROUP_M * num_n_tiles
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m_tiles - first_m, GROUP_M)
    m_tile = first_m + (pid % per_group) % group_size
    n_tile = (pid % per_group) // group_size
    return m_tile, n_tile


@triton.jit
def expert_tile_table(m_sizes_ptr, E, M, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """The per-expert schedule of a persistent kernel, computed once per program: (expert
    ids, row counts, M-tile counts, inclusive tile prefix sums, first expert-order row of
    each expert (int64), total M-tiles). Sizes as ``safe_sizes`` (cut to the M rows of the
    tensors, so the total is at most cdiv(M, BLOCK_M) + E tiles)."""
    experts, sizes, starts = safe_sizes(m_sizes_ptr, E, M, E_POW2)
    tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    return experts, sizes, tiles, tiles_end, starts, tl.sum(tiles, 0)


@triton.jit
def find_m_tile(tile, experts, sizes, tiles, tiles_end, starts, BLOCK_M: tl.constexpr):
    """``locate_m_tile`` over a precomputed ``expert_tile_table``; `tile` must be below the
    table's total (a persistent grid visits only real tiles)."""
    expert = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    this = experts == expert
    first_tile = tl.sum(tl.where(this, tiles_end - tiles, 0), 0)
    expert_start = tl.sum(tl.where(this, starts, 0), 0)
    expert_rows = tl.sum(tl.where(this, sizes, 0), 0)
    return expert, expert_start, expert_rows, (tile - first_tile) * BLOCK_M


@triton.jit
def routed_rows(m_sizes_ptr, E, E_POW2: tl.constexpr):
    """sum(m_sizes) (int64, negative sizes counted as zero): expert-order positions at or
    past it belong to routing slots that were dropped (expert ids outside [0, E): another
    rank's experts), which no GEMM writes or reads. Callers also bound it by their row
    count (m_sizes may overcount when value checks are off)."""
    experts = tl.arange(0, E_POW2)
    sizes = tl.load(m_sizes_ptr + experts, mask=experts < E, other=0).to(tl.int64)
    return tl.sum(tl.maximum(sizes, 0), 0)


@triton.jit
def clamp_index(index, num_rows):
    """Gather indices clamped into [0, num_rows). Value checks are off by default, so an
    index may be anything; a clamped one reads or writes a wrong row of the tensor (wrong
    numbers, allowed) instead of an address outside it. The identity for valid indices.
    A min and a max per row, in the index's own dtype (compiled for sm_90, 12 to 80 more
    PTX instructions per kernel; masking the row off instead took up to 230: the mask
    travels into every masked load)."""
    return tl.minimum(tl.maximum(index, 0), num_rows - 1)


def programs_for(device, config, element_size: int, stage_elems: int,
                 epilogue_elems: int = 0) -> int:
    """Grid size of a persistent kernel: programs per SM times the SM count.
    ``stage_elems``: operand elements one pipeline stage holds (both tiles);
    ``epilogue_elems``: the output elements staged in shared memory for a TMA store.

    Two programs share an SM when two sets of pipeline buffers fit its shared memory
    (~227 KB on Hopper) and each program is one warpgroup: the second program's MMAs then
    run during the first one's epilogue (measured: 128 x 128 tiles on 4 warps, two per
    SM, 554 against 500 TFLOP/s for one 8-warp program at qwen3_w2, K = 768). On the
    interpreter a few programs still exercise the tile loop's striding."""
    if device.type != "cuda":
        return 3
    buffers = (config.num_stages * stage_elems + epilogue_elems) * element_size
    per_sm = 2 if config.num_warps <= 4 and 2 * buffers <= 200 * 1024 else 1
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
