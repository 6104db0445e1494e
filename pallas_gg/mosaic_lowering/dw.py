"""dW on Mosaic GPU: dW[e] [N, K] = dY_e^T X_e, ragged along the reduction (the rows).

A persistent kernel over (expert, output tile) pairs. Each visit streams the expert's rows in
BLOCK_R-row slices of dY and X (TMA, ``emit_pipeline``) into a wgmma accumulator; the slices
are aligned to multiples of BLOCK_R from the start of the arrays, so the first and the last
slice of an expert can hold rows of its neighbours: those rows of both slices are replaced
by zeros in shared memory before the MMA (a select, so a neighbour's NaN or Inf stays out;
the masking idea of JAX's transposed ragged-dot example). An
expert without rows runs no step and stores its zero accumulator: exact zeros. The per-expert
row ranges come from m_sizes on the device (no host sync).

X [M, K] and dY [M, N] in expert order (the fusions gather them first, see ``ops``); bf16 /
fp16; N % BLOCK_M == 0 and K % BLOCK_N == 0 (whole TMA tiles of the output).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_gg.mosaic_lowering._common import (pad_rows, padded_rows, run_persistent,
                                               smem_transforms)
from pallas_gg.mosaic_lowering.matmul import MosaicConfig
from pallas_gg.mosaic_lowering.schedule import expert_row_ranges


def _expert_slices(m_sizes, m: int, block_r: int):
    """Per expert: first row, end row, first aligned slice row, number of slices."""
    starts, ends = expert_row_ranges(m_sizes, m)   # clamped into [0, m]: memory-safe
    sizes = ends - starts
    slice_start = starts // block_r * block_r
    slice_end = -(-ends // block_r) * block_r
    num_slices = jnp.where(sizes > 0, (slice_end - slice_start) // block_r, 0)
    return starts, ends, slice_start, num_slices


def grouped_dw(x: jax.Array, dy: jax.Array, m_sizes: jax.Array, *,
               config: MosaicConfig = MosaicConfig(block_m=128, block_n=128, block_k=64),
               interpret=False) -> jax.Array:
    """dW [E, N, K] in x's dtype. config: block_m x block_n is the output tile (over N and
    K), block_k the reduction slice (rows)."""
    m, k = x.shape
    n = dy.shape[1]
    num_experts = m_sizes.shape[0]
    bm, bn, br = config.block_m, config.block_n, config.block_k
    if x.dtype != dy.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"the Mosaic GPU kernels take bf16 or fp16 operands of one dtype; "
                         f"got X {x.dtype}, dY {dy.dtype}")
    if n % bm or k % bn:
        raise ValueError(f"the Mosaic GPU dW needs whole TMA output tiles: N={n} must be a "
                         f"multiple of {bm} and K={k} of {bn} (X {x.shape}, dY {dy.shape})")
    if m == 0:
        return jnp.zeros((num_experts, n, k), x.dtype)
    if padded_rows(m) != m:  # whole 8-row tiles for TMA (``_common.padded_rows``); the
        # zero rows past m belong to no expert
        return grouped_dw(pad_rows(x, padded_rows(m)), pad_rows(dy, padded_rows(m)),
                          m_sizes, config=config, interpret=interpret)
    starts, ends, slice_start, num_slices = _expert_slices(m_sizes, m, br)
    grid_n, grid_k = n // bm, k // bn
    dy_tf, x_tf = smem_transforms(bm, dy.dtype), smem_transforms(bn, x.dtype)

    def body(starts_g, ends_g, slice_start_g, num_slices_g, x_gmem, dy_gmem, out_gmem):
        @plgpu.nd_loop((num_experts, grid_n * grid_k), collective_axes="sm")
        def _visit(info: plgpu.NDLoopInfo):
            e = info.index[0]
            ni = info.index[1] // grid_k
            ki = info.index[1] % grid_k
            steps = num_slices_g[e]
            first = pl.multiple_of(slice_start_g[e], br)
            rows = pl.ds(first, m)  # may extend past M: the pipeline reads `steps` slices only

            def acc_scope(acc_ref):
                def rows_of(ref, s):
                    return (plgpu.layout_cast(
                        lax.broadcasted_iota(jnp.int32, ref.shape, 0), plgpu.Layout.WGMMA)
                        + first + s * br)

                def keep_own_rows(ref, s):
                    # a select, not a multiply: a neighbour's NaN or Inf must not leak in
                    row = rows_of(ref, s)
                    own = (row >= starts_g[e]) & (row < ends_g[e])
                    ref[...] = jnp.where(own, ref[...], jnp.zeros((), ref.dtype))

                def step(idx, dy_smem, x_smem):
                    s = idx[0]

                    @pl.when((s == 0) | (s == steps - 1))
                    def _():  # zero the neighbours' rows of a boundary slice, both operands
                        keep_own_rows(dy_smem, s)
                        keep_own_rows(x_smem, s)
                        plgpu.commit_smem()

                    plgpu.wgmma(acc_ref, dy_smem.transpose((1, 0)), x_smem)

                @pl.when(steps > 0)
                def _():
                    plgpu.emit_pipeline(
                        step,
                        grid=(steps,),
                        in_specs=[
                            plgpu.BlockSpec((br, bm), lambda s: (s, ni), delay_release=1,
                                            transforms=dy_tf),
                            plgpu.BlockSpec((br, bn), lambda s: (s, ki), delay_release=1,
                                            transforms=x_tf),
                        ],
                        max_concurrent_steps=max(2, config.max_concurrent_steps),
                    )(dy_gmem.at[rows, :], x_gmem.at[rows, :])
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn)))

            @functools.partial(pl.run_scoped,
                               o_smem=plgpu.SMEM((bm, bn), dtype=out_gmem.dtype,
                                                 transforms=x_tf))
            def _store(o_smem):
                o_smem[...] = acc.astype(o_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    o_smem, out_gmem.at[e, pl.ds(ni * bm, bm), pl.ds(ki * bn, bn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return run_persistent(body, jax.ShapeDtypeStruct((num_experts, n, k), x.dtype),
                          (starts, ends, slice_start, num_slices, x, dy),
                          num_sms=config.num_sms, interpret=interpret)
