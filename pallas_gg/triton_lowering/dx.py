"""dX grouped GEMM kernel: dX[p] = dY[row(p)] @ W[e(p)], Triton lowering of Pallas.

One program per (row tile, K tile); the reduction runs over N in ``block_n`` steps,
accumulating dY_tile [BM, BN] @ W[e]_tile [BN, BK] in fp32.

* ``permute_y`` (dY in routed-row order): row p of dY is gathered at gather[p];
* ``permute_x`` (X was gathered in the forward): row p of dX is scattered to gather[p], so dX
  comes out in routed-row order [M, K]; the differentiable op sums each token's k rows.

The same kernel computes ``ragged_dot``'s forward (lhs @ rhs[g] with rhs [G, K, N] read as
W [E, N_w=K, K_w=N]); its tail tiles (rows past sum(group_sizes), expert id E) store zeros.
Config TMA switches are ignored (see ``common.compiler_params``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gg_spec import DXConfig
from pallas_gg import schedule
from pallas_gg.triton_lowering import common


def _dx_kernel(tiles_ref, gather_ref, dy_ref, w_ref, dx_ref, *, num_experts, n, k,
               num_rows, num_row_tiles, num_k_tiles, block_m, block_n, block_k, group_m,
               permute_x, permute_y):
    tile, k_tile = common.swizzle(pl.program_id(0), num_row_tiles, num_k_tiles, group_m)
    expert = tiles_ref[schedule.TILE_EXPERT, tile]
    row_start = tiles_ref[schedule.TILE_ROW_START, tile]
    row_end = tiles_ref[schedule.TILE_ROW_END, tile]

    @pl.when(row_start < row_end)  # padding slots of the tile table own no rows
    def _():
        positions = row_start + jnp.arange(block_m, dtype=jnp.int32)
        row_ok = positions < row_end
        # routed_ok: row_ok and an in-range gather index (a row with a bad index is dropped
        # wherever the index would address memory: the gather from dY, the scatter into dX)
        routed, routed_ok = (common.load_routed_rows(gather_ref, positions, row_ok, num_rows)
                             if permute_x or permute_y else (None, row_ok))
        dy_rows = routed if permute_y else positions
        dy_ok = routed_ok if permute_y else row_ok
        ks = common.block_range(k_tile, block_k)
        k_ok = ks < k
        w_expert = lax.min(expert, jnp.int32(num_experts - 1))

        def n_step(j, acc):
            ns = common.block_range(j, block_n)
            n_ok = ns < n
            dy = common.load_tile(dy_ref, dy_rows, ns, dy_ok, n_ok)
            w = common.load_tile(w_ref, ns, ks, n_ok, k_ok, lead=w_expert)
            return acc + common.dot(dy, w)

        # The tail group (expert id E) has no weights: its rows stay zero.
        num_n_steps = common.select(expert < num_experts, schedule.cdiv(n, block_n), 0)
        acc = lax.fori_loop(0, num_n_steps, n_step,
                            jnp.zeros((block_m, block_k), jnp.float32))
        out_rows = routed if permute_x else common.select(
            row_ok, positions, common.out_of_range_rows(num_rows, block_m))
        common.store_tile(dx_ref, out_rows, ks, routed_ok if permute_x else row_ok, k_ok,
                          acc)


@functools.partial(jax.jit, static_argnames=("permute_x", "permute_y", "config", "interpret",
                                             "num_rows", "out_dtype"))
def _dx(dy, w, m_sizes, gather_indices, *, num_rows: int, permute_x: bool, permute_y: bool,
        config: DXConfig, interpret: bool, out_dtype):
    """The jitted launch (out_dtype already canonical, so that callers share one cache)."""
    num_experts, n, k = w.shape
    if num_rows == 0 or k == 0:
        return jnp.zeros((num_rows, k), out_dtype)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    tiles = schedule.row_tile_table(m_sizes, num_rows, bm)
    num_row_tiles = tiles.shape[1]
    num_k_tiles = schedule.cdiv(k, bk)
    kernel = functools.partial(
        _dx_kernel, num_experts=num_experts, n=n, k=k, num_rows=num_rows,
        num_row_tiles=num_row_tiles, num_k_tiles=num_k_tiles, block_m=bm, block_n=bn,
        block_k=bk, group_m=config.group_m, permute_x=permute_x, permute_y=permute_y)
    gather = (common.dummy_index_array() if gather_indices is None
              else gather_indices.astype(jnp.int32))
    return common.run_kernel(
        kernel, out_shape=jax.ShapeDtypeStruct((num_rows, k), out_dtype),
        grid=(num_row_tiles * num_k_tiles,), config=config, interpret=interpret,
        name="pallas_gg_dx", args=(tiles, gather, dy, w))


def dx(dy, w, m_sizes, gather_indices, *, num_rows: int, permute_x: bool, permute_y: bool,
       config: DXConfig, interpret: bool, out_dtype=None):
    """Launch the dX kernel (no validation: see ``pallas_gg.grouped_gemm_dX``).

    dX [num_rows, K] in ``out_dtype`` (default dY's dtype) for dY [M, N], W [E, N, K],
    m_sizes [E] (sum <= num_rows; rows past the sum come out zero), gather_indices [M] int32
    (or None without permutes). No experts or an empty reduction (N = 0): zeros, no launch.
    """
    num_experts, n, k = w.shape
    out_dtype = jnp.dtype(dy.dtype if out_dtype is None else out_dtype)
    if num_experts == 0 or n == 0 or k == 0 or num_rows == 0:
        return jnp.zeros((num_rows, k), out_dtype)
    return _dx(dy, w, m_sizes, gather_indices, num_rows=num_rows, permute_x=permute_x,
               permute_y=permute_y, config=config, interpret=interpret, out_dtype=out_dtype)
