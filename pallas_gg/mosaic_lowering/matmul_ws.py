"""Grouped GEMM on Mosaic GPU, warp-specialized: out[p] = lhs[p] @ rhs[e(p)] (see ``matmul``).

The same persistent walk over the device-built schedule as ``matmul.grouped_matmul``, with
three warpgroups per SM: one memory warpgroup issues the TMA loads of every slice, two
compute warpgroups each own half of a BLOCK_M x BLOCK_N output tile (BLOCK_N / 2 columns,
one 128-row wgmma accumulator each). The memory warpgroup runs ahead into the next visit
while the compute warpgroups store the last one (their TMA stores are waited for only
before their shared-memory tile is reused), so loads, MMAs and stores overlap; the
one-warpgroup kernel serialises them. The pattern is that of JAX's Hopper matmul example
(``emit_pipeline_warp_specialized``), applied to ragged row blocks: a visit stores only its
expert's rows (power-of-two TMA stores, ``matmul.store_row_range``), and tail visits
(rows past sum(m_sizes)) store zeros without loading anything.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_gg.mosaic_lowering._common import (grouped_visit, pad_rows, padded_rows,
                                               run_persistent, smem_transforms)
from pallas_gg.mosaic_lowering.matmul import MosaicConfig, _check, store_row_range
from pallas_gg.mosaic_lowering.schedule import tile_schedule

NUM_COMPUTE_WGS = 2


def grouped_matmul_ws(lhs: jax.Array, rhs: jax.Array, m_sizes: jax.Array, *,
                      transpose_rhs: bool, config: MosaicConfig,
                      interpret=False) -> jax.Array:
    """As ``matmul.grouped_matmul``; config.block_n is the output tile's width, split
    between the two compute warpgroups (block_n / 2 each, a multiple of 64)."""
    cfg = config
    n, k = _check(lhs, rhs, m_sizes, transpose_rhs, cfg)
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    wg_n = bn // NUM_COMPUTE_WGS
    if wg_n % 64 or bm % 64:
        raise ValueError(f"the warp-specialized kernel needs block_m and block_n / 2 in "
                         f"multiples of 64 (wgmma), got block_m={bm}, block_n={bn}")
    if cfg.max_concurrent_steps < 2:
        raise ValueError("the warp-specialized kernel needs max_concurrent_steps >= 2")
    rows_in = lhs.shape[0]
    if rows_in == 0:
        return jnp.zeros((0, n), lhs.dtype)
    m = padded_rows(rows_in)
    if m != rows_in:  # whole 8-row tiles for TMA (``matmul.grouped_matmul``)
        return grouped_matmul_ws(pad_rows(lhs, m), rhs, m_sizes, transpose_rhs=transpose_rhs,
                                 config=config, interpret=interpret)[:rows_in]
    num_experts = rhs.shape[0]
    sched = tile_schedule(m_sizes, m, bm, zero_tail=True)
    grid_n = n // bn
    num_tiles = sched.expert.shape[0]
    visits = num_tiles * grid_n
    dtype = lhs.dtype
    lhs_tf = smem_transforms(bk, dtype)
    rhs_tf = smem_transforms(bk if transpose_rhs else bn, dtype)
    max_rows = min(bm, m)

    def pipeline(block, ni, body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k // bk,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((bm, bk), lambda kk: (block, kk), transforms=lhs_tf,
                                delay_release=1),
                plgpu.BlockSpec((bn, bk) if transpose_rhs else (bk, bn),
                                (lambda kk: (ni, kk)) if transpose_rhs
                                else (lambda kk: (kk, ni)),
                                transforms=rhs_tf, delay_release=1),
            ],
            wg_axis="wg",
            num_compute_wgs=NUM_COMPUTE_WGS,
            max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=compute_context,
        )

    def body(expert_g, block_g, start_g, rows_g, lhs_gmem, rhs_gmem, out_gmem):
        ignore = lambda *_, **__: None  # noqa: E731 - allocations depend on shapes only
        allocs = pipeline(0, 0, ignore, ignore).get_allocations(lhs_gmem, rhs_gmem.at[0])

        @functools.partial(
            pl.run_scoped,
            allocs=allocs,
            out_smem=plgpu.SMEM((NUM_COMPUTE_WGS, bm, wg_n), out_gmem.dtype),
            collective_axes="wg",
        )
        def _scope(allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((visits,), collective_axes="sm")
            def _visit(info: plgpu.NDLoopInfo):
                tile, ni = grouped_visit(info.index[0], num_tiles, grid_n, cfg.group_m)
                rows = rows_g[tile]
                expert, block, start = expert_g[tile], block_g[tile], start_g[tile]
                compute = expert < num_experts  # expert == E: rows past sum(m_sizes)

                def store(acc_ref):
                    """This warpgroup's half of the tile, its expert's rows only."""
                    acc = acc_ref[...].astype(out_gmem.dtype)
                    # the previous visit's stores must have read out_smem[wg]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem[wg] = acc
                    plgpu.commit_smem()
                    store_row_range(out_smem.at[wg],
                                    out_gmem.at[:, pl.ds(ni * bn + wg * wg_n, wg_n)],
                                    block * bm, start, rows, max_rows)

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped,
                                       acc_ref=plgpu.ACC((bm, wg_n), jnp.float32))
                    def _(acc_ref):
                        eval_pipeline(acc_ref)
                        store(acc_ref)

                def mma(_, lhs_smem, rhs_smem, acc_ref):
                    cols = pl.ds(wg * wg_n, wg_n)
                    plgpu.wgmma(acc_ref, lhs_smem,
                                rhs_smem.at[cols].transpose((1, 0)) if transpose_rhs
                                else rhs_smem.at[:, cols])
                    plgpu.wgmma_wait(1)  # one MMA in flight (delay_release=1)
                    return acc_ref

                @pl.when((rows > 0) & compute)
                def _():
                    rhs_e = rhs_gmem.at[jnp.minimum(expert, num_experts - 1)]
                    pipeline(block, ni, mma, compute_context)(lhs_gmem, rhs_e,
                                                             allocations=allocs)

                @pl.when((rows > 0) & ~compute & (wg < NUM_COMPUTE_WGS))
                def _():  # zeros from an untouched accumulator
                    pl.run_scoped(store, plgpu.ACC((bm, wg_n), jnp.float32))

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return run_persistent(body, jax.ShapeDtypeStruct((m, n), lhs.dtype),
                          (sched.expert, sched.block, sched.start, sched.rows, lhs, rhs),
                          num_sms=cfg.num_sms, interpret=interpret,
                          num_threads=NUM_COMPUTE_WGS + 1)
