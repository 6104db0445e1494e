"""The contract's forward, dX and dW on the Mosaic GPU kernels, fusions as separate passes.

On Hopper TMA cannot gather rows (that arrives with Blackwell), so this first version applies
the fusions around the TMA-fed grouped GEMM: permute_x gathers X into expert order first
(``x[gather // topk]``), permute_y scatters the rows into routed order after, fuse_mul_post
scales them on the way. Fused row gathers (per-row copies by a producer warpgroup) are the
alternative still to be written and measured against this. Same signatures as
``pallas_gg.triton_lowering``; a gg_spec config's tile sizes are used when one is given
(``num_stages`` as the number of TMA slices in flight), else ``default_matmul_config`` (two
compute warpgroups on 128 x 256 where the output width allows) and 128 x 128 x 64 for dW.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_gg.mosaic_lowering._common import pad_rows, padded_rows
from pallas_gg.mosaic_lowering.dw import grouped_dw
from pallas_gg.mosaic_lowering.matmul import MosaicConfig, grouped_matmul

DTYPES = (jnp.bfloat16, jnp.float16)


def check_supported(*arrays) -> None:
    for a in arrays:
        if a.dtype not in DTYPES:
            raise NotImplementedError(
                f"backend='mosaic' runs bf16 and fp16 only (wgmma operands), got {a.dtype}; "
                f"use backend='triton' for {a.dtype}")


def default_matmul_config(out_columns: int) -> MosaicConfig:
    """The forward's / dX's tile by output width (H200 sweep, benchmarks/NOTES.md step 12):
    the warp-specialized 128 x 256 tile where 256 columns divide (3 slices in flight: 3 x 48
    KiB + two 32 KiB out tiles), else one warpgroup's 128 x 128 (6 slices), else 128 x 64."""
    if out_columns % 256 == 0:
        return MosaicConfig(block_n=256, max_concurrent_steps=3, compute_wgs=2)
    return MosaicConfig(block_n=_default_out_tile(out_columns))


def _default_out_tile(columns: int) -> int:
    """128 output columns per tile where they divide, else 64: the same shapes as the
    forward's default (whose contraction tile is 64) then run dX and dW too."""
    return 128 if columns % 128 == 0 else 64


def _take_rows(a, indices, rows: int):
    """a[indices] padded with copies of row 0 to `rows` rows (the kernels' 8-row tiling,
    ``_common.padded_rows``: the gather that makes the copy anyway makes it padded). The
    indices are clamped into [0, len(a)): a gather index out of range (unchecked, value
    checks are opt-in) reads a wrong row, never outside a. The padded rows belong to no
    expert: the GEMMs store zeros there and dW masks them."""
    idx = jnp.clip(indices.astype(jnp.int32), 0, max(a.shape[0] - 1, 0))
    idx = pad_rows(idx, rows)
    return jnp.take(a, idx, axis=0, mode="clip") if a.shape[0] else jnp.zeros(
        (rows,) + a.shape[1:], a.dtype)


def _to_routed_rows(a, gather_indices):
    """Expert-order rows -> routed-row order (row p stored at gather_indices[p]), as a row
    gather through the inverse permutation: XLA's row scatter (``.at[g].set``) ran at 127
    TFLOP/s-equivalent on qwen3_w2 (H200), a gather moves the same bytes as permute_x's.
    gather_indices is a permutation of the M rows (dropped slots included). a may hold more
    rows than M (kernel padding): only its first M are read. An index out of range or
    repeated (wrong routing values) gives wrong rows, never an access outside a: the scatter
    drops indices out of range, and the inverse's entries are clamped."""
    m = gather_indices.shape[0]
    inverse = jnp.zeros((m,), jnp.int32).at[gather_indices].set(
        jnp.arange(m, dtype=jnp.int32), mode="drop")
    return jnp.take(a, jnp.clip(inverse, 0, m - 1), axis=0, mode="clip")


def _row_scale(topk_weights, gather_indices, rows: int):
    """fuse_mul_post's fp32 scale of each expert-order row (padded to `rows`: the padded
    rows are zeros, any scale will do)."""
    return _take_rows(topk_weights.astype(jnp.float32)[:, None], gather_indices, rows)[:, 0]


def forward(x, w, m_sizes, gather_indices, topk_weights, *, topk, num_rows, permute_x,
            permute_y, fuse_mul_post, config, interpret, out_dtype=None):
    m = gather_indices.shape[0] if permute_x else x.shape[0]
    out_dtype = out_dtype or x.dtype
    if m == 0 or 0 in w.shape[1:]:  # nothing to multiply: zeros, no kernel
        return jnp.zeros((m, w.shape[1]), out_dtype)
    check_supported(x, w)
    cfg = (default_matmul_config(w.shape[1]) if config is None else
           MosaicConfig(config.block_m, config.block_n, config.block_k, config.num_stages,
                        group_m=config.group_m))
    rows = padded_rows(m)
    if permute_x:
        x = _take_rows(x, jnp.clip(gather_indices, 0, None) // topk, rows)
    # rows > m only with permute_x (the padded gather); else the kernel pads and slices
    y = grouped_matmul(x, w, m_sizes, transpose_rhs=True, config=cfg, interpret=interpret)
    if fuse_mul_post:
        scale = _row_scale(topk_weights, gather_indices, y.shape[0])
        y = (y.astype(jnp.float32) * scale[:, None]).astype(y.dtype)
    if permute_y:
        y = _to_routed_rows(y, gather_indices)
    return y[:m].astype(out_dtype)


def dx(dy, w, m_sizes, gather_indices, *, num_rows, permute_x, permute_y, config, interpret,
       out_dtype=None):
    m = gather_indices.shape[0] if permute_y else dy.shape[0]
    out_dtype = out_dtype or dy.dtype
    k = w.shape[2]
    if m == 0 or 0 in w.shape[1:]:  # nothing to multiply: zeros, no kernel
        return jnp.zeros((m, k), out_dtype)
    check_supported(dy, w)
    # dX's output columns are K (the config's block_k), its reduction runs over N (block_n)
    cfg = (default_matmul_config(k) if config is None else
           MosaicConfig(config.block_m, config.block_k, config.block_n, config.num_stages))
    if permute_y:
        dy = _take_rows(dy, gather_indices, padded_rows(m))
    dx_ = grouped_matmul(dy, w, m_sizes, transpose_rhs=False, config=cfg,
                         interpret=interpret)
    if permute_x:
        dx_ = _to_routed_rows(dx_, gather_indices)
    return dx_[:m].astype(out_dtype)


def dw(x, dy, m_sizes, gather_indices, *, topk, permute_x, permute_y, config, interpret,
       out_dtype=None):
    # dW's output tile is (N, K) = (config.block_n, config.block_k); block_m is the reduction
    n, k = dy.shape[1], x.shape[1]
    out_dtype = out_dtype or x.dtype
    m = gather_indices.shape[0] if (permute_x or permute_y) else x.shape[0]
    if m == 0 or n == 0 or k == 0:  # an empty reduction or output: exact zeros, no kernel
        return jnp.zeros((m_sizes.shape[0], n, k), out_dtype)
    check_supported(x, dy)
    cfg = (MosaicConfig(block_m=_default_out_tile(n), block_n=_default_out_tile(k),
                        block_k=64) if config is None else
           MosaicConfig(config.block_n, config.block_k, config.block_m, config.num_stages))
    rows = padded_rows(m)
    if permute_x:
        x = _take_rows(x, jnp.clip(gather_indices, 0, None) // topk, rows)
    if permute_y:
        dy = _take_rows(dy, gather_indices, rows)
    # both operands with the same (padded) rows: one gathered, the other padded here
    x, dy = pad_rows(x, rows), pad_rows(dy, rows)
    out = grouped_dw(x, dy, m_sizes, config=cfg, interpret=interpret)
    return out.astype(out_dtype)
