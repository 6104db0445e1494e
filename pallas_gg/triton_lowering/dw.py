"""dW grouped GEMM kernel: dW[e] = sum over p in e of dY[row(p)]^T X[row(p)], Triton lowering.

One program per (expert, N tile, K tile); it loops over the expert's expert-order positions
in ``block_m`` chunks (the reduction), accumulating dY_chunk [BM, BN]^T @ X_chunk [BM, BK] in
fp32, and stores its [BN, BK] tile once. Every tile of dW is written by exactly one program,
so no atomics are needed and an expert without rows gets exact zeros.

* ``permute_x``: X is [T, K] in token order, row p reads X[gather[p] // topk];
* ``permute_y``: dY is in routed-row order, row p reads dY[gather[p]].

Config TMA switches are ignored (see ``common.compiler_params``); ``group_m`` does not apply
(there are no row tiles to group).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gg_spec import DWConfig
from pallas_gg import schedule
from pallas_gg.triton_lowering import common


def _dw_kernel(offs_ref, gather_ref, x_ref, dy_ref, dw_ref, *, topk, n, k, num_rows,
               num_n_tiles, num_k_tiles, block_m, block_n, block_k, permute_x, permute_y):
    pid = pl.program_id(0)
    expert = common.div(pid, num_n_tiles * num_k_tiles)
    n_tile = common.rem(common.div(pid, num_k_tiles), num_n_tiles)
    k_tile = common.rem(pid, num_k_tiles)
    first, end = offs_ref[expert], offs_ref[expert + 1]
    ns = common.block_range(n_tile, block_n)
    ks = common.block_range(k_tile, block_k)
    n_ok, k_ok = ns < n, ks < k

    def m_step(i, acc):
        positions = first + common.block_range(i, block_m)
        row_ok = positions < end
        if permute_x or permute_y:  # a row with an out-of-range gather index is dropped
            routed, row_ok = common.load_routed_rows(gather_ref, positions, row_ok, num_rows)
        x_rows = common.div(routed, topk) if permute_x else positions
        dy_rows = routed if permute_y else positions
        x = common.load_tile(x_ref, x_rows, ks, row_ok, k_ok)
        dy = common.load_tile(dy_ref, dy_rows, ns, row_ok, n_ok)
        return acc + common.dot(dy, x, trans_a=True)

    acc = lax.fori_loop(0, common.cdiv(end - first, block_m), m_step,
                        jnp.zeros((block_n, block_k), jnp.float32))
    common.store_tile(dw_ref, ns, ks, n_ok, k_ok, acc, lead=expert)


@functools.partial(jax.jit, static_argnames=("topk", "permute_x", "permute_y", "config",
                                             "interpret", "out_dtype"))
def _dw(x, dy, m_sizes, gather_indices, *, topk: int, permute_x: bool, permute_y: bool,
        config: DWConfig, interpret: bool, out_dtype):
    """The jitted launch (out_dtype already canonical, so that callers share one cache)."""
    num_rows, n = dy.shape
    k = x.shape[1]
    num_experts = m_sizes.shape[0]
    if num_rows == 0 or num_experts * n * k == 0:
        return jnp.zeros((num_experts, n, k), out_dtype)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    offs = schedule.expert_offsets(m_sizes, num_rows)
    num_n_tiles, num_k_tiles = schedule.cdiv(n, bn), schedule.cdiv(k, bk)
    kernel = functools.partial(
        _dw_kernel, topk=topk, n=n, k=k, num_rows=num_rows, num_n_tiles=num_n_tiles,
        num_k_tiles=num_k_tiles, block_m=bm, block_n=bn, block_k=bk, permute_x=permute_x,
        permute_y=permute_y)
    gather = (common.dummy_index_array() if gather_indices is None
              else gather_indices.astype(jnp.int32))
    return common.run_kernel(
        kernel, out_shape=jax.ShapeDtypeStruct((num_experts, n, k), out_dtype),
        grid=(num_experts * num_n_tiles * num_k_tiles,), config=config, interpret=interpret,
        name="pallas_gg_dw", args=(offs, gather, x, dy))


def dw(x, dy, m_sizes, gather_indices, *, topk: int, permute_x: bool, permute_y: bool,
       config: DWConfig, interpret: bool, out_dtype=None):
    """Launch the dW kernel (no validation: see ``pallas_gg.grouped_gemm_dW``).

    dW [E, N, K] in ``out_dtype`` (default X's dtype) for X [M or T, K], dY [M, N],
    m_sizes [E], gather_indices [M] int32 (or None without permutes). No experts, an empty
    output or no rows: zeros, no launch.
    """
    num_experts, n, k = m_sizes.shape[0], dy.shape[1], x.shape[1]
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if num_experts == 0 or n == 0 or k == 0 or dy.shape[0] == 0:
        return jnp.zeros((num_experts, n, k), out_dtype)
    return _dw(x, dy, m_sizes, gather_indices, topk=topk, permute_x=permute_x,
               permute_y=permute_y, config=config, interpret=interpret, out_dtype=out_dtype)
