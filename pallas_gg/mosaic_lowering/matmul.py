"""Grouped GEMM on Mosaic GPU: out[p] = lhs[p] @ rhs[e(p)] (rhs[e] transposed for W [E, N, K]).

A persistent kernel: one program per SM walks (tile, N-block) pairs of the device-built
schedule (``schedule.tile_schedule``). Each visit streams BLOCK_K slices of the aligned lhs row
block and of the expert's weights through shared memory with TMA (``emit_pipeline``,
``max_concurrent_steps`` slices in flight) into a wgmma accumulator, then stores the
expert's rows of the block. A TMA store has a static row count, so a visit's rows are stored
as a sum of power-of-two slices (at most log2(BLOCK_M) + 1 copies), the technique of JAX's
Mosaic GPU ragged_dot example.

Forward: lhs = X [M, K], rhs = W [E, N, K] (transpose_rhs=True). dX: lhs = dY [M, N],
rhs = W [E, N, K] read as [K-contraction = N, out = K] (transpose_rhs=False). bf16 / fp16
operands, fp32 accumulation. TMA needs whole blocks along the contraction and output
columns: K % BLOCK_K == 0 and N % BLOCK_N == 0 are checked with a ValueError.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_gg.mosaic_lowering._common import (grouped_visit, pad_rows, padded_rows,
                                               run_persistent)
from pallas_gg.mosaic_lowering.schedule import tile_schedule


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 6   # 6 x 32 KiB of operand slices + the 32 KiB out tile
    num_sms: int = 132        # H100 SXM: 132, H200: 132
    # 1: one warpgroup loads, multiplies and stores (this module); 2: two compute
    # warpgroups split block_n and a memory warpgroup feeds them (``matmul_ws``)
    compute_wgs: int = 1
    # visits walk group_m schedule tiles per N-block column (L2 reuse of the expert's
    # weight blocks; 1 = row-major): ``_common.grouped_visit``
    group_m: int = 8


def _check(lhs, rhs, m_sizes, transpose_rhs, cfg):
    if lhs.ndim != 2 or rhs.ndim != 3 or m_sizes.ndim != 1:
        raise ValueError(f"expected lhs [M, K], rhs [E, ., .], m_sizes [E]; got "
                         f"{lhs.shape}, {rhs.shape}, {m_sizes.shape}")
    if lhs.dtype != rhs.dtype or lhs.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the Mosaic GPU kernels take bf16 or fp16 operands of one dtype "
                         f"(wgmma); got lhs {lhs.dtype}, rhs {rhs.dtype}")
    e, a, b = rhs.shape
    n, k = (a, b) if transpose_rhs else (b, a)
    if lhs.shape[1] != k or m_sizes.shape[0] != e:
        raise ValueError(f"lhs {lhs.shape}, rhs {rhs.shape} (transpose_rhs={transpose_rhs}) "
                         f"and m_sizes {m_sizes.shape} disagree on K or E")
    bad = ([f"contraction {k} is not a multiple of block_k={cfg.block_k}"] if k % cfg.block_k
           else []) + ([f"output columns {n} are not a multiple of block_n={cfg.block_n}"]
                       if n % cfg.block_n else [])
    if bad:
        raise ValueError("the Mosaic GPU kernels need whole TMA blocks: " + "; ".join(bad)
                         + f" (lhs {lhs.shape}, rhs {rhs.shape})")
    return n, k


def store_row_range(o_smem, out_gmem, block_row, start, rows, max_rows: int):
    """TMA-store rows start .. start + rows of the tile in o_smem to out_gmem rows
    block_row + start ... A TMA store has a static row count, so the rows go as a sum of
    powers of two, one static-size copy per set bit of `rows` (at most log2(max_rows) + 1
    copies; the technique of JAX's Mosaic GPU ragged_dot example). Not waited for."""
    offset = start
    for bit in reversed(range(int(math.log2(max_rows)) + 1)):
        size = 1 << bit

        @pl.when(rows & size != 0)
        def _():
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, size)],
                                    out_gmem.at[pl.ds(block_row + offset, size)])
        offset += rows & size


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, m_sizes: jax.Array, *,
                   transpose_rhs: bool, config: MosaicConfig = MosaicConfig(),
                   interpret=False) -> jax.Array:
    """out [M, N]: rows of expert e (consecutive, m_sizes[e] of them) times rhs[e]
    (rhs[e].T with transpose_rhs). Rows past sum(m_sizes) are zeros (stored by the kernel).
    Any M: more than 8 rows that are not a multiple of 8 run padded to one (TMA's 8-row
    tiling of the arrays; ``_common.padded_rows``), at the cost of a copy of lhs and of the
    output. m_sizes may hold anything: see ``schedule.expert_row_ranges``.

    interpret: False (compile for the GPU), True (Mosaic GPU's interpreter, on any device) or
    a ``plgpu.InterpretGPUParams`` (the interpreter with those settings, e.g. its race
    detector)."""
    cfg = config
    if cfg.compute_wgs == 2:
        from pallas_gg.mosaic_lowering.matmul_ws import grouped_matmul_ws
        return grouped_matmul_ws(lhs, rhs, m_sizes, transpose_rhs=transpose_rhs, config=cfg,
                                 interpret=interpret)
    if cfg.compute_wgs != 1:
        raise ValueError(f"compute_wgs must be 1 or 2, got {cfg.compute_wgs}")
    n, k = _check(lhs, rhs, m_sizes, transpose_rhs, cfg)
    rows_in = lhs.shape[0]
    if rows_in == 0:
        return jnp.zeros((0, n), lhs.dtype)
    m = padded_rows(rows_in)
    if m != rows_in:  # whole 8-row tiles for TMA: pad, run, slice (one copy each way)
        return grouped_matmul(pad_rows(lhs, m), rhs, m_sizes, transpose_rhs=transpose_rhs,
                              config=cfg, interpret=interpret)[:rows_in]
    num_experts = rhs.shape[0]
    sched = tile_schedule(m_sizes, m, cfg.block_m, zero_tail=True)
    grid_n = n // cfg.block_n
    num_tiles = sched.expert.shape[0]
    visits = num_tiles * grid_n
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k

    def body(expert_g, block_g, start_g, rows_g, lhs_gmem, rhs_gmem, out_gmem):
        @plgpu.nd_loop((visits,), collective_axes="sm")
        def _visit(info: plgpu.NDLoopInfo):
            tile, ni = grouped_visit(info.index[0], num_tiles, grid_n, cfg.group_m)
            rows = rows_g[tile]

            @pl.when(rows > 0)
            def _():
                expert, block, start = expert_g[tile], block_g[tile], start_g[tile]
                # expert == E: rows past sum(m_sizes), stored from the untouched (zero)
                # accumulator
                compute = expert < num_experts
                rhs_e = rhs_gmem.at[jnp.minimum(expert, num_experts - 1)]

                def acc_scope(acc_ref):
                    @pl.when(compute)
                    def _():
                        _pipeline(acc_ref, block, ni, lhs_gmem, rhs_e)
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))
                _store_rows(acc, block, start, rows, ni, out_gmem)

    def _pipeline(acc_ref, block, ni, lhs_gmem, rhs_e):
        plgpu.emit_pipeline(
            lambda _, lhs_smem, rhs_smem: plgpu.wgmma(
                acc_ref, lhs_smem,
                rhs_smem.transpose((1, 0)) if transpose_rhs else rhs_smem),
            grid=(k // bk,),
            in_specs=[
                plgpu.BlockSpec((bm, bk), lambda kk: (block, kk), delay_release=1),
                plgpu.BlockSpec((bn, bk) if transpose_rhs else (bk, bn),
                                (lambda kk: (ni, kk)) if transpose_rhs
                                else (lambda kk: (kk, ni)),
                                delay_release=1),
            ],
            max_concurrent_steps=cfg.max_concurrent_steps,
        )(lhs_gmem, rhs_e)

    def _store_rows(acc, block, start, rows, ni, out_gmem):
        """Rows start .. start + rows of the block's accumulator to the output."""
        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), dtype=out_gmem.dtype))
        def _(o_smem):
            o_smem[...] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            store_row_range(o_smem, out_gmem.at[:, pl.ds(ni * bn, bn)], block * bm, start,
                            rows, min(bm, m))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return run_persistent(body, jax.ShapeDtypeStruct((m, n), lhs.dtype),
                          (sched.expert, sched.block, sched.start, sched.rows, lhs, rhs),
                          num_sms=cfg.num_sms, interpret=interpret)
