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


def _to_routed_rows(a, gather_indices):
    """Expert-order rows -> routed-row order (row p stored at gather_indices[p]), as a row
    gather through the inverse permutation: XLA's row scatter (``.at[g].set``) ran at 127
    TFLOP/s-equivalent on qwen3_w2 (H200), a gather moves the same bytes as permute_x's.
    gather_indices is a permutation of the M rows (dropped slots included)."""
    m = gather_indices.shape[0]
    inverse = jnp.zeros((m,), jnp.int32).at[gather_indices].set(jnp.arange(m, dtype=jnp.int32))
    return a[inverse]


def forward(x, w, m_sizes, gather_indices, topk_weights, *, topk, num_rows, permute_x,
            permute_y, fuse_mul_post, config, interpret, out_dtype=None):
    check_supported(x, w)
    cfg = (default_matmul_config(w.shape[1]) if config is None else
           MosaicConfig(config.block_m, config.block_n, config.block_k, config.num_stages,
                        group_m=config.group_m))
    if permute_x:
        x = x[gather_indices // topk]
    y = grouped_matmul(x, w, m_sizes, transpose_rhs=True, config=cfg, interpret=interpret)
    if fuse_mul_post:
        scale = topk_weights[gather_indices].astype(jnp.float32)
        y = (y.astype(jnp.float32) * scale[:, None]).astype(y.dtype)
    if permute_y:
        y = _to_routed_rows(y, gather_indices)
    return y.astype(out_dtype or y.dtype)


def dx(dy, w, m_sizes, gather_indices, *, num_rows, permute_x, permute_y, config, interpret,
       out_dtype=None):
    check_supported(dy, w)
    # dX's output columns are K (the config's block_k), its reduction runs over N (block_n)
    k = w.shape[2]
    cfg = (default_matmul_config(k) if config is None else
           MosaicConfig(config.block_m, config.block_k, config.block_n, config.num_stages))
    if permute_y:
        dy = dy[gather_indices]
    dx_ = grouped_matmul(dy, w, m_sizes, transpose_rhs=False, config=cfg,
                         interpret=interpret)
    if permute_x:
        dx_ = _to_routed_rows(dx_, gather_indices)
    return dx_.astype(out_dtype or dx_.dtype)


def dw(x, dy, m_sizes, gather_indices, *, topk, permute_x, permute_y, config, interpret,
       out_dtype=None):
    check_supported(x, dy)
    # dW's output tile is (N, K) = (config.block_n, config.block_k); block_m is the reduction
    n, k = dy.shape[1], x.shape[1]
    cfg = (MosaicConfig(block_m=_default_out_tile(n), block_n=_default_out_tile(k),
                        block_k=64) if config is None else
           MosaicConfig(config.block_n, config.block_k, config.block_m, config.num_stages))
    if permute_x:
        x = x[gather_indices // topk]
    if permute_y:
        dy = dy[gather_indices]
    out = grouped_dw(x, dy, m_sizes, config=cfg, interpret=interpret)
    return out.astype(out_dtype or out.dtype)
