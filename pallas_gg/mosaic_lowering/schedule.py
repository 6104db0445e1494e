"""The work schedule of the Mosaic GPU kernels, built on the device once per routing.

The rows of X are in expert order, split into row blocks of BLOCK_M aligned to the start of X
(so every TMA load of X reads one aligned block). A block that holds rows of several experts
is visited once per expert; each visit computes the whole block against that expert's
weights and stores only that expert's rows. Tile t of the schedule is
(expert, row block, first row of the expert within the block, number of its rows), a few
int32 arrays of length ``num_tiles(M, E, BLOCK_M)`` (an upper bound, known without reading
m_sizes; unused tiles have 0 rows). Built with jnp ops: no host sync, traceable under jit,
and a kernel looks its tile up instead of searching the experts (JAX's Mosaic GPU
ragged_dot example searches with an unrolled loop over the experts, which measured 36-54%
of the dense rate with 128 experts).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class TileSchedule(NamedTuple):
    expert: jax.Array      # [num_tiles] int32
    block: jax.Array       # [num_tiles] row block of X (rows block*BLOCK_M ...)
    start: jax.Array       # [num_tiles] first row of the expert within the block
    rows: jax.Array        # [num_tiles] rows of the expert within the block (0: unused)


def num_tiles(m: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the visits: each row block once, plus one per expert boundary."""
    return max(1, -(-m // block_m) + num_experts - 1)


def expert_row_ranges(m_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """(starts, ends) [E] int32: expert e owns rows [starts[e], ends[e]), and
    0 <= starts[e] <= ends[e] <= m whatever m_sizes holds.

    Wrong routing values (unchecked under jit; value checks are opt-in) may give wrong
    numbers, never an access outside the arrays: a negative size counts as 0, and the rows
    past m are cut off (experts past m own none). For valid m_sizes (non-negative, sum <= m)
    these are the plain offsets. The running sum saturates at m (``min(a + b, m)``, written
    ``min(a, m - b) + b`` so that no partial sum can overflow int32, however large the
    sizes)."""
    sizes = jnp.clip(m_sizes.astype(jnp.int32), 0, m)
    if sizes.shape[0] == 0:
        return sizes, sizes
    ends = lax.associative_scan(lambda a, b: jnp.minimum(a, m - b) + b, sizes)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def tile_schedule(m_sizes: jax.Array, m: int, block_m: int, *,
                  zero_tail: bool = False) -> TileSchedule:
    """The schedule for m_sizes [E] (rows per expert, summing to at most m).

    zero_tail: the rows past sum(m_sizes) become visits of a pseudo-expert E (tiles with
    expert == E), which the kernel stores as zeros: the contract zeroes those rows, and
    doing it in the kernel's own stores saves a pass over the whole output."""
    starts, ends = expert_row_ranges(m_sizes, m)
    if zero_tail:
        tail_start = ends[-1:] if ends.shape[0] else jnp.zeros((1,), jnp.int32)
        starts = jnp.concatenate([starts, tail_start])
        ends = jnp.concatenate([ends, jnp.full((1,), m, jnp.int32)])
    sizes = ends - starts
    num_experts = sizes.shape[0]
    first_block = starts // block_m
    last_block = (ends - 1) // block_m
    visits = jnp.where(sizes > 0, last_block - first_block + 1, 0)   # [E]
    visits_end = jnp.cumsum(visits)
    t = jnp.arange(num_tiles(m, num_experts, block_m), dtype=jnp.int32)
    expert = jnp.searchsorted(visits_end, t, side="right").astype(jnp.int32)
    used = expert < num_experts
    e = jnp.minimum(expert, num_experts - 1)
    block = first_block[e] + t - (visits_end[e] - visits[e])
    block_start = block * block_m
    lo = jnp.maximum(starts[e], block_start)
    hi = jnp.minimum(ends[e], block_start + block_m)
    rows = jnp.where(used, hi - lo, 0)
    return TileSchedule(jnp.where(used, e, 0), jnp.where(used, block, 0),
                        jnp.where(used, lo - block_start, 0), rows)
