"""``grouped_gemm``: the differentiable grouped GEMM, a ``jax.custom_vjp`` over the kernels.

Gradients (DESIGN.md; ``gg_spec.reference.grouped_gemm_grads`` is the ground truth):

* dX = grouped_gemm_dX(dY_scaled): [M, K] in expert order, or with ``permute_x`` the kernel
  writes routed-row order [M, K] and the k routed copies of each token are summed to [T, K];
* dW = grouped_gemm_dW(X, dY_scaled), [E, N, K];
* with ``fuse_mul_post``: dY_scaled[row] = dY[row] * topk_weights[routed row], and
  d_topk_weights[r] = <dY[r], Y_unweighted[r]>, computed without keeping Y_unweighted as
  <dY[p] @ W[e], X[p]> = <dX_unscaled[p], X[p]>: the dX kernel runs on the unscaled dY with an
  fp32 output, the row dot and the row scaling are elementwise jnp work (one extra read of
  X and of dX, and one materialised dY_scaled [M, N] for the dW kernel).

m_sizes and gather_indices get no gradient; topk and every flag and config are static.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gg_spec import DWConfig, DXConfig, ForwardConfig
from pallas_gg._backend import (pick_lowering, resolve_backend, triton_lowering_module,
                                use_interpreter)
from pallas_gg.mosaic_lowering import ops as mosaic_lowering
from pallas_gg._validate import check_routing_values
from pallas_gg.ops import check_forward_args, config_for
from pallas_gg.tuning import autotuned_config, lookup_config


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is not an array (hashable: a custom_vjp nondiff arg)."""

    topk: int
    num_rows: int
    permute_x: bool
    permute_y: bool
    fuse_mul_post: bool
    forward_config: ForwardConfig
    dx_config: DXConfig
    dw_config: DWConfig
    interpret: bool
    # the lowering of the forward, dX and dW: "triton" or "mosaic" (pallas_gg.mosaic_lowering,
    # whose configs may be None)
    lowerings: tuple[str, str, str] = ("triton", "triton", "triton")


_OPS = ("forward", "dX", "dW")


def _impl(s: _Static, op: str):
    if s.lowerings[_OPS.index(op)] == "mosaic":
        return mosaic_lowering
    return triton_lowering_module()  # imported on first use: a JAX may not have it


def _forward(s: _Static, x, w, m_sizes, gather, topk_weights):
    return _impl(s, "forward").forward(
        x, w, m_sizes, gather, topk_weights, topk=s.topk, num_rows=s.num_rows,
        permute_x=s.permute_x, permute_y=s.permute_y, fuse_mul_post=s.fuse_mul_post,
        config=s.forward_config, interpret=s.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _op(s, x, w, m_sizes, gather, topk_weights):
    return _forward(s, x, w, m_sizes, gather, topk_weights)


def _op_fwd(s, x, w, m_sizes, gather, topk_weights):
    y = _forward(s, x, w, m_sizes, gather, topk_weights)
    return y, (x, w, m_sizes, gather, topk_weights)


def _sum_token_copies(dx_routed, topk: int, dtype):
    """[M, K] in routed-row order -> [T, K]: each token's k rows summed in fp32."""
    m, k = dx_routed.shape
    return dx_routed.astype(jnp.float32).reshape(m // topk, topk, k).sum(axis=1).astype(dtype)


def _op_bwd(s: _Static, residuals, dy):
    x, w, m_sizes, gather, topk_weights = residuals

    def dx_kernel(dy_, out_dtype=None):
        return _impl(s, "dX").dx(dy_, w, m_sizes, gather, num_rows=s.num_rows,
                                  permute_x=s.permute_x, permute_y=s.permute_y,
                                  config=s.dx_config, interpret=s.interpret,
                                  out_dtype=out_dtype)

    d_weights = None
    if s.fuse_mul_post:
        weights = topk_weights.astype(jnp.float32)
        # The routing weight of each row of Y (and dY), in Y's row order.
        y_row_weight = weights if s.permute_y else weights[gather]
        dy_scaled = (dy.astype(jnp.float32) * y_row_weight[:, None]).astype(dy.dtype)
        dx_unscaled = dx_kernel(dy, jnp.float32)
        if s.permute_x:
            # dX rows are routed rows r, whose X row is token r // k.
            tokens, k = x.shape
            per_row = jnp.sum(dx_unscaled.reshape(tokens, s.topk, k)
                              * x.astype(jnp.float32)[:, None, :], axis=-1).reshape(-1)
            d_weights = per_row
            dx_row_weight = weights
        else:
            # dX rows are expert-order positions p, routed row gather[p].
            per_pos = jnp.sum(dx_unscaled * x.astype(jnp.float32), axis=-1)
            d_weights = jnp.zeros_like(weights).at[gather].set(per_pos)
            dx_row_weight = weights[gather]
        dx = dx_unscaled * dx_row_weight[:, None]
        d_weights = d_weights.astype(topk_weights.dtype)
    else:
        dy_scaled = dy
        dx = dx_kernel(dy)
    dx = _sum_token_copies(dx, s.topk, x.dtype) if s.permute_x else dx.astype(x.dtype)
    dw = _impl(s, "dW").dw(x, dy_scaled, m_sizes, gather, topk=s.topk, permute_x=s.permute_x,
                            permute_y=s.permute_y, config=s.dw_config, interpret=s.interpret,
                            out_dtype=w.dtype)
    return dx, dw, None, None, d_weights


_op.defvjp(_op_fwd, _op_bwd)


def grouped_gemm(X, W, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False,
                 topk_weights=None, fuse_mul_post=False, forward_config=None, dx_config=None,
                 dw_config=None, autotune=False, backend="auto"):
    """The differentiable grouped GEMM: Y as ``grouped_gemm_forward``, with gradients for X,
    W and (with ``fuse_mul_post``) topk_weights under jax.grad / jax.vjp, inside jax.jit too.

    Shapes: X [M, K] (or [T, K] with ``permute_x``), W [E, N, K], m_sizes [E],
    gather_indices [M], topk_weights [M] (routed-row order) -> Y [M, N]. The gradient of X
    has X's shape ([T, K] with permute_x: each token's k routed copies summed). Without
    ``fuse_mul_post`` topk_weights is not read and its gradient is zero.

    Configs left None take the cached or shipped one for this card and shape, else the
    default (``gg_spec.tuning_cache.lookup``), or with ``autotune=True`` the tuned one
    (``pallas_gg.tune``; on CPU nothing is timed). An explicit config always wins.
    """
    resolve_backend(backend, mosaic_ready=True)
    X, W, m_sizes, gather_indices, topk_weights, dims = check_forward_args(
        X, W, m_sizes, gather_indices, topk_weights, topk, permute_x=permute_x,
        permute_y=permute_y, fuse_mul_post=fuse_mul_post)
    # before any tuning runs on them
    check_routing_values(dims, m_sizes, gather_indices,
                         fused=permute_x or permute_y or fuse_mul_post)
    interpret = use_interpreter(X, W)
    fusions = dict(permute_x=permute_x, permute_y=permute_y)
    configs = {"forward": forward_config, "dX": dx_config, "dW": dw_config}
    lowerings = []
    for op, config in configs.items():
        fused = permute_x or permute_y or (fuse_mul_post and op != "dW")
        lowering = pick_lowering(backend, op=op, dtype=X.dtype, n=dims.n, k=dims.k,
                                 fused=fused, config_given=config is not None or autotune,
                                 interpret=interpret)
        mosaic = lowering == "mosaic"
        if config is None and autotune and not mosaic:  # no tuner for Mosaic yet
            config = autotuned_config(op, X, W, m_sizes, gather_indices, topk,
                                      topk_weights=topk_weights, fuse_mul_post=fuse_mul_post,
                                      interpret=interpret, **fusions)
        elif config is None and not mosaic:  # cached, shipped or default (memoised)
            config = lookup_config(op, num_experts=dims.num_experts, n=dims.n, k=dims.k,
                                   rows=dims.m, dtype=X.dtype,
                                   fuse_mul_post=fuse_mul_post and op == "forward", **fusions)
        mul = {"fuse_mul_post": fuse_mul_post} if op == "forward" else {}
        configs[op] = config_for(op, config, mosaic=mosaic, **fusions, **mul)
        lowerings.append(lowering)
    static = _Static(topk, dims.m, permute_x, permute_y, fuse_mul_post, configs["forward"],
                     configs["dX"], configs["dW"], interpret, tuple(lowerings))
    gather = None if gather_indices is None else gather_indices.astype(jnp.int32)
    return _op(static, X, W, m_sizes, gather, topk_weights if fuse_mul_post else None)

