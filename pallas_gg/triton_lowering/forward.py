"""Forward grouped GEMM kernel: Y[p] = X[row(p)] @ W[e(p)].T, Triton lowering of Pallas.

One program per (row tile, N tile). A row tile holds up to ``block_m`` expert-order positions
of one expert (see ``pallas_gg.schedule``); the program loops over K in ``block_k`` steps,
accumulating X_tile [BM, BK] @ W[e]_tile[BN, BK]^T in fp32, then applies the epilogue:

* ``permute_x``: X rows are gathered in the load, row p reads X[gather[p] // topk] ([T, K]);
* ``fuse_mul_post``: row p is scaled by topk_weights[gather[p]] (in fp32, before rounding);
* ``permute_y``: row p is scattered in the store, to Y[gather[p]].

Tail tiles (expert id E: rows past sum(m_sizes), used by ragged_dot) skip the K loop and
store zeros. Config TMA switches are ignored (see ``common.compiler_params``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gg_spec import ForwardConfig
from pallas_gg import schedule
from pallas_gg.triton_lowering import common


def _forward_kernel(tiles_ref, gather_ref, weights_ref, x_ref, w_ref, y_ref, *,
                    num_experts, topk, k, n, num_rows, num_row_tiles, num_n_tiles,
                    block_m, block_n, block_k, group_m, permute_x, permute_y,
                    fuse_mul_post):
    tile, n_tile = common.swizzle(pl.program_id(0), num_row_tiles, num_n_tiles, group_m)
    expert = tiles_ref[schedule.TILE_EXPERT, tile]
    row_start = tiles_ref[schedule.TILE_ROW_START, tile]
    row_end = tiles_ref[schedule.TILE_ROW_END, tile]

    @pl.when(row_start < row_end)  # padding slots of the tile table own no rows
    def _():
        positions = row_start + jnp.arange(block_m, dtype=jnp.int32)
        row_ok = positions < row_end
        uses_gather = permute_x or permute_y or fuse_mul_post
        # routed_ok: row_ok and an in-range gather index (a row with a bad index is dropped
        # wherever the index would address memory: X, topk_weights, the scatter into Y)
        routed, routed_ok = (common.load_routed_rows(gather_ref, positions, row_ok, num_rows)
                             if uses_gather else (None, row_ok))
        x_rows = common.div(routed, topk) if permute_x else positions
        x_ok = routed_ok if permute_x else row_ok
        cols = common.block_range(n_tile, block_n)
        col_ok = cols < n
        w_expert = lax.min(expert, jnp.int32(num_experts - 1))

        def k_step(i, acc):
            ks = common.block_range(i, block_k)
            k_ok = ks < k
            x = common.load_tile(x_ref, x_rows, ks, x_ok, k_ok)
            w = common.load_tile(w_ref, cols, ks, col_ok, k_ok, lead=w_expert)
            return acc + common.dot(x, w, trans_b=True)

        # The tail group (expert id E) has no weights: its rows stay zero.
        num_k_steps = common.select(expert < num_experts, schedule.cdiv(k, block_k), 0)
        acc = lax.fori_loop(0, num_k_steps, k_step,
                            jnp.zeros((block_m, block_n), jnp.float32))
        if fuse_mul_post:
            scale = common.load_vector(weights_ref, routed, routed_ok)
            acc = acc * scale.astype(jnp.float32)[:, None]
        out_rows = routed if permute_y else common.select(
            row_ok, positions, common.out_of_range_rows(num_rows, block_m))
        common.store_tile(y_ref, out_rows, cols, routed_ok if permute_y else row_ok, col_ok,
                          acc)


@functools.partial(jax.jit, static_argnames=("topk", "permute_x", "permute_y",
                                             "fuse_mul_post", "config", "interpret",
                                             "num_rows", "out_dtype"))
def _forward(x, w, m_sizes, gather_indices, topk_weights, *, topk: int, num_rows: int,
             permute_x: bool, permute_y: bool, fuse_mul_post: bool, config: ForwardConfig,
             interpret: bool, out_dtype):
    """The jitted launch (out_dtype already canonical, so that callers share one cache)."""
    num_experts, n, k = w.shape
    if num_rows == 0 or n == 0:
        return jnp.zeros((num_rows, n), out_dtype)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    tiles = schedule.row_tile_table(m_sizes, num_rows, bm)
    num_row_tiles = tiles.shape[1]
    num_n_tiles = schedule.cdiv(n, bn)
    kernel = functools.partial(
        _forward_kernel, num_experts=num_experts, topk=topk, k=k, n=n, num_rows=num_rows,
        num_row_tiles=num_row_tiles, num_n_tiles=num_n_tiles, block_m=bm, block_n=bn,
        block_k=bk, group_m=config.group_m, permute_x=permute_x, permute_y=permute_y,
        fuse_mul_post=fuse_mul_post)
    gather = (common.dummy_index_array() if gather_indices is None
              else gather_indices.astype(jnp.int32))
    weights = topk_weights if fuse_mul_post else jnp.zeros((1,), jnp.float32)
    return common.run_kernel(
        kernel, out_shape=jax.ShapeDtypeStruct((num_rows, n), out_dtype),
        grid=(num_row_tiles * num_n_tiles,), config=config, interpret=interpret,
        name="pallas_gg_forward", args=(tiles, gather, weights, x, w))


def forward(x, w, m_sizes, gather_indices, topk_weights, *, topk: int, num_rows: int,
            permute_x: bool, permute_y: bool, fuse_mul_post: bool, config: ForwardConfig,
            interpret: bool, out_dtype=None):
    """Launch the forward kernel (no validation: see ``pallas_gg.grouped_gemm_forward``).

    Y [num_rows, N] in ``out_dtype`` (default X's dtype) for X [M or T, K], W [E, N, K],
    m_sizes [E] (sum <= num_rows; rows past the sum come out zero), gather_indices [M] int32
    (or None without fusions), topk_weights [M] (or None without fuse_mul_post). No experts
    or an empty reduction (K = 0): zeros, no launch.
    """
    num_experts, n, k = w.shape
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if num_experts == 0 or k == 0 or n == 0 or num_rows == 0:
        return jnp.zeros((num_rows, n), out_dtype)
    return _forward(x, w, m_sizes, gather_indices, topk_weights, topk=topk, num_rows=num_rows,
                    permute_x=permute_x, permute_y=permute_y, fuse_mul_post=fuse_mul_post,
                    config=config, interpret=interpret, out_dtype=out_dtype)
