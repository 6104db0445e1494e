"""The direct (non-differentiable) grouped GEMMs: forward, dX and dW.

Each function validates its arguments up front (shapes, dtypes, devices and config through
``gg_spec``; the routing values when they are concrete), then launches one kernel of the
chosen lowering. See DESIGN.md for the contract; shapes use E experts, N outputs, K inputs,
M routed rows (= sum(m_sizes)), T tokens and k = topk.
"""

from __future__ import annotations

import jax.numpy as jnp

import gg_spec
from gg_spec import checks
from pallas_gg import tuning
from pallas_gg._backend import (pick_lowering, resolve_backend, triton_lowering_module,
                                use_interpreter)
from pallas_gg.mosaic_lowering import ops as mosaic_lowering


def _lowering(backend: str, op: str, dims, *, dtype, fused: bool, config, interpret: bool):
    """The lowering module of one call (``pick_lowering``)."""
    name = pick_lowering(backend, op=op, dtype=dtype, n=dims.n, k=dims.k, fused=fused,
                         config_given=config is not None, interpret=interpret)
    return mosaic_lowering if name == "mosaic" else triton_lowering_module()
from pallas_gg._validate import arg_infos, as_array, check_routing_values


def resolve_config(op: str, config, *, dtype=None, **fusions):
    """The config to run (the default for ``op`` when None: with ``dtype``, one that fits
    shared memory for it), refused by gg_spec.validate when it conflicts with the fusions."""
    config = gg_spec.default_config(op, _dtype_name(dtype)) if config is None else config
    gg_spec.validate(op, config, **fusions)
    return config


def _dtype_name(dtype):
    """gg_spec's name of a floating dtype it sizes configs for; None for any other."""
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name
    return name if name in gg_spec.configs.ELEMENT_SIZES else None


def config_for(op: str, config, *, mosaic: bool, **fusions):
    """The config a lowering runs: validated (the default when None) for the Triton lowering;
    on Mosaic None stays None (its kernels pick their own tiles) and a given one is validated."""
    if config is None and mosaic:
        return None
    return resolve_config(op, config, **fusions)


def _looked_up(op, config, lowering, dims, dtype, permute_x, permute_y, fuse_mul_post=False):
    """The given config; else, for the Triton lowering, the cached or shipped one of this
    card and shape or the default (``tuning.lookup_config``); Mosaic keeps None (its own
    tiles)."""
    if config is not None or lowering is mosaic_lowering:
        return config
    return tuning.lookup_config(op, num_experts=dims.num_experts, n=dims.n, k=dims.k,
                                rows=dims.m, dtype=dtype, permute_x=permute_x,
                                permute_y=permute_y, fuse_mul_post=fuse_mul_post)


def _index_array(a):
    return None if a is None else a.astype(jnp.int32)


def check_forward_args(X, W, m_sizes, gather_indices, topk_weights, topk, *, permute_x,
                       permute_y, fuse_mul_post):
    """The forward's arguments as arrays, and their Dims (shape checks of gg_spec); shared by
    ``grouped_gemm_forward`` and the differentiable ``grouped_gemm``."""
    X, W, m_sizes, gather_indices, topk_weights = map(
        as_array, (X, W, m_sizes, gather_indices, topk_weights))
    info = arg_infos(X=X, W=W, m_sizes=m_sizes, gather_indices=gather_indices,
                     topk_weights=topk_weights)
    dims = checks.check_forward(info["X"], info["W"], info["m_sizes"], info["gather_indices"],
                                topk, permute_x=permute_x, permute_y=permute_y,
                                topk_weights=info["topk_weights"], fuse_mul_post=fuse_mul_post)
    return X, W, m_sizes, gather_indices, topk_weights, dims


def grouped_gemm_forward(X, W, m_sizes, gather_indices, topk, *, permute_x=False,
                         permute_y=False, topk_weights=None, fuse_mul_post=False, config=None,
                         backend="auto"):
    """Y [M, N]: Y[p] = X[row(p)] @ W[e(p)].T, in the dtype of X.

    X [M, K] in expert order, or [T, K] in token order with ``permute_x`` (row p reads
    X[gather_indices[p] // topk]); W [E, N, K]; m_sizes [E] int; gather_indices [M] int
    (required with any fusion); topk_weights [M] in routed-row order (with ``fuse_mul_post``
    row p is scaled by topk_weights[gather_indices[p]]). With ``permute_y`` row p is stored at
    Y[gather_indices[p]] (Y in routed-row order). ``config`` is a ``ForwardConfig``.
    """
    resolve_backend(backend, mosaic_ready=True)
    X, W, m_sizes, gather_indices, topk_weights, dims = check_forward_args(
        X, W, m_sizes, gather_indices, topk_weights, topk, permute_x=permute_x,
        permute_y=permute_y, fuse_mul_post=fuse_mul_post)
    fused = permute_x or permute_y or fuse_mul_post
    # before a tuner could time them
    check_routing_values(dims, m_sizes, gather_indices, fused=fused)
    interpret = use_interpreter(X, W)
    lowering = _lowering(backend, "forward", dims, dtype=X.dtype, config=config,
                         fused=fused, interpret=interpret)
    config = config_for("forward", _looked_up("forward", config, lowering, dims, X.dtype,
                                              permute_x, permute_y, fuse_mul_post),
                        mosaic=lowering is mosaic_lowering, permute_x=permute_x,
                        permute_y=permute_y, fuse_mul_post=fuse_mul_post)
    return lowering.forward(
        X, W, m_sizes, _index_array(gather_indices),
        topk_weights if fuse_mul_post else None, topk=topk, num_rows=dims.m,
        permute_x=permute_x, permute_y=permute_y, fuse_mul_post=fuse_mul_post, config=config,
        interpret=interpret)


def grouped_gemm_dX(dY, W, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False,
                    config=None, backend="auto"):
    """dX [M, K]: dX[p] = dY[row(p)] @ W[e(p)], in the dtype of dY.

    dY [M, N] in the order of Y (routed-row order with ``permute_y``: row p reads
    dY[gather_indices[p]]); W [E, N, K]. With ``permute_x`` row p is stored at
    dX[gather_indices[p]] (routed-row order; the differentiable op sums each token's k rows).
    ``config`` is a ``DXConfig``.
    """
    resolve_backend(backend, mosaic_ready=True)
    dY, W, m_sizes, gather_indices = map(as_array, (dY, W, m_sizes, gather_indices))
    info = arg_infos(dY=dY, W=W, m_sizes=m_sizes, gather_indices=gather_indices)
    dims = checks.check_dX(info["dY"], info["W"], info["m_sizes"], info["gather_indices"],
                           topk, permute_x=permute_x, permute_y=permute_y)
    check_routing_values(dims, m_sizes, gather_indices, fused=permute_x or permute_y)
    interpret = use_interpreter(dY, W)
    lowering = _lowering(backend, "dX", dims, dtype=dY.dtype, config=config,
                         fused=permute_x or permute_y, interpret=interpret)
    config = config_for("dX", _looked_up("dX", config, lowering, dims, dY.dtype, permute_x,
                                         permute_y),
                        mosaic=lowering is mosaic_lowering, permute_x=permute_x,
                        permute_y=permute_y)
    return lowering.dx(
        dY, W, m_sizes, _index_array(gather_indices), num_rows=dims.m, permute_x=permute_x,
        permute_y=permute_y, config=config, interpret=interpret)


def grouped_gemm_dW(X, dY, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False,
                    config=None, backend="auto"):
    """dW [E, N, K]: dW[e] = sum over p in e of dY[row(p)]^T X[row(p)], in the dtype of X.

    X [M, K] (or [T, K] with ``permute_x``) and dY [M, N] (routed-row order with
    ``permute_y``) follow the gather rules of the forward and dX. An expert without rows gets
    exact zeros. ``config`` is a ``DWConfig`` (block_m is the reduction block).
    """
    resolve_backend(backend, mosaic_ready=True)
    X, dY, m_sizes, gather_indices = map(as_array, (X, dY, m_sizes, gather_indices))
    info = arg_infos(X=X, dY=dY, m_sizes=m_sizes, gather_indices=gather_indices)
    dims = checks.check_dW(info["X"], info["dY"], info["m_sizes"], info["gather_indices"],
                           topk, permute_x=permute_x, permute_y=permute_y)
    check_routing_values(dims, m_sizes, gather_indices, fused=permute_x or permute_y)
    interpret = use_interpreter(X, dY)
    lowering = _lowering(backend, "dW", dims, dtype=X.dtype, config=config,
                         fused=permute_x or permute_y, interpret=interpret)
    config = config_for("dW", _looked_up("dW", config, lowering, dims, X.dtype, permute_x,
                                         permute_y),
                        mosaic=lowering is mosaic_lowering, permute_x=permute_x,
                        permute_y=permute_y)
    return lowering.dw(
        X, dY, m_sizes, _index_array(gather_indices), topk=topk, permute_x=permute_x,
        permute_y=permute_y, config=config, interpret=interpret)
