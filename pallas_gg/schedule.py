"""The tile schedule of the row-tiled kernels, built on the device with jnp (jit-friendly).

The grouped GEMMs tile the M routed rows expert by expert: expert ``e`` owns the
expert-order positions ``[offs[e], offs[e+1])`` and gets ``cdiv(m_sizes[e], block_m)`` row
tiles that never straddle two experts. The number of tiles depends on the values of m_sizes,
but a kernel's grid must be static, so the grid is the upper bound ``cdiv(M, block_m) + E``
and a table says, for every tile slot, which expert it serves and which rows it owns;
slots past the real tiles own an empty row range and return at once.

Rows past ``sum(m_sizes)`` (allowed for ``ragged_dot``, whose trailing rows are zero) form
one more group, the *tail*, whose expert id is ``E``: its tiles write zeros.
"""

from __future__ import annotations

import jax.numpy as jnp

# Rows of the tile table.
TILE_EXPERT, TILE_ROW_START, TILE_ROW_END = 0, 1, 2


def cdiv(a, b):
    return (a + b - 1) // b


def max_row_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the row tiles of E experts plus the tail group.

    With G groups of sizes summing to M, sum(cdiv(size, BM)) <= cdiv(M, BM) + G - 1, and
    G = E + 1 here (the tail group).
    """
    return cdiv(num_rows, block_m) + num_experts


def expert_offsets(m_sizes, num_rows: int):
    """offs [E+1] int32: expert e owns positions [offs[e], offs[e+1]).

    Kernels are memory-safe for any routing values (wrong m_sizes under jit cannot be
    checked, and value checks are off by default): the offsets are clipped to
    ``[0, num_rows]``, so no kernel is sent past either end of its arrays (even where an
    int32 sum wraps), and a negative size counts as zero (as in triton_gg) instead of moving
    the later experts' rows back. The identity for valid routing.
    """
    ends = jnp.cumsum(jnp.maximum(m_sizes.astype(jnp.int32), 0))
    ends = jnp.clip(ends, 0, num_rows)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])


def row_tile_table(m_sizes, num_rows: int, block_m: int):
    """The tile table [3, max_row_tiles] int32: expert id, first row, end row of each tile.

    Tile slots past the real tiles get expert 0 and the empty row range [0, 0); tiles of the
    tail group (rows past sum(m_sizes)) get expert id E.
    """
    num_experts = m_sizes.shape[0]
    offs = expert_offsets(m_sizes, num_rows)
    group_start = offs                                             # [E+1], tail starts at offs[E]
    group_size = jnp.concatenate([offs[1:] - offs[:-1], num_rows - offs[-1:]])
    tiles_per_group = cdiv(group_size, block_m)
    tile_ends = jnp.cumsum(tiles_per_group)
    num_slots = max_row_tiles(num_rows, num_experts, block_m)
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    group = jnp.searchsorted(tile_ends, slot, side="right").astype(jnp.int32)
    real = group <= num_experts
    group = jnp.minimum(group, num_experts)
    first_slot = tile_ends[group] - tiles_per_group[group]
    row_start = group_start[group] + (slot - first_slot) * block_m
    row_end = group_start[group] + group_size[group]
    return jnp.stack([
        jnp.where(real, group, 0),
        jnp.where(real, row_start, 0),
        jnp.where(real, row_end, 0),
    ]).astype(jnp.int32)
