"""Public functions of triton_gg (the contract of DESIGN.md, on torch tensors).

Shapes: X [M, K] in expert order (or [T, K] in token order with permute_x), W [E, N, K]
(``nn.Linear`` layout, y = x @ W[e].T), m_sizes [E] int32, gather_indices [M] (routed row of
each expert-order position, from ``route``), topk_weights [M] in routed-row order.
Inputs bf16, fp16 or fp32; fp32 accumulation; outputs in the input dtype.
"""

from __future__ import annotations

import torch

from gg_spec import DWConfig, DXConfig, ForwardConfig
from triton_gg import _ops, autotune
from triton_gg import _validate as v

# forward-only calls carry no backward configs
_NO_CONFIG = _ops.encode(DXConfig())


def _forward_config(config, autotune_on, dims, x, w, m_sizes, gather, topk, permute_x,
                    permute_y, topk_weights, fuse_mul_post):
    def run(cfg):
        return _ops.forward_impl(x, w, m_sizes, gather, topk_weights, topk, permute_x,
                                 permute_y, fuse_mul_post, False, _ops.encode(cfg))
    return autotune.choose(
        "forward", config, autotune_on,
        lambda: autotune.key_for("forward", dims, x.dtype, x.device, permute_x=permute_x,
                                 permute_y=permute_y, fuse_mul_post=fuse_mul_post),
        run, x.device, permute_x=permute_x, permute_y=permute_y)


def _dx_config(config, autotune_on, dims, dy, w, m_sizes, gather, topk, permute_x, permute_y):
    def run(cfg):
        return _ops.dx_impl(dy, w, m_sizes, gather, topk, permute_x, permute_y,
                            _ops.encode(cfg))
    return autotune.choose(
        "dX", config, autotune_on,
        lambda: autotune.key_for("dX", dims, dy.dtype, dy.device, permute_x=permute_x,
                                 permute_y=permute_y),
        run, dy.device, permute_x=permute_x, permute_y=permute_y)


def _dw_config(config, autotune_on, dims, x, dy, m_sizes, gather, topk, permute_x, permute_y):
    def run(cfg):
        return _ops.dw_impl(x, dy, m_sizes, gather, topk, permute_x, permute_y,
                            _ops.encode(cfg), False)
    return autotune.choose(
        "dW", config, autotune_on,
        lambda: autotune.key_for("dW", dims, x.dtype, x.device, permute_x=permute_x,
                                 permute_y=permute_y),
        run, x.device, permute_x=permute_x, permute_y=permute_y)


def grouped_gemm_forward(X: torch.Tensor, W: torch.Tensor, m_sizes: torch.Tensor,
                         gather_indices: torch.Tensor | None, topk: int, *,
                         permute_x: bool = False, permute_y: bool = False,
                         topk_weights: torch.Tensor | None = None, fuse_mul_post: bool = False,
                         config: ForwardConfig | None = None,
                         autotune: bool = False) -> torch.Tensor:
    """Y [M, N] = X[row(p)] @ W[e(p)].T for every expert-order position p.

    permute_x: X is [T, K] in token order and row p reads X[gather_indices[p] // topk].
    permute_y: row p is stored at Y[gather_indices[p]] (Y in routed-row order).
    fuse_mul_post: row p is scaled by topk_weights[gather_indices[p]].
    Not differentiable: use ``grouped_gemm`` for training.
    """
    dims = v.check_forward(X, W, m_sizes, gather_indices, topk, permute_x=permute_x,
                           permute_y=permute_y, topk_weights=topk_weights,
                           fuse_mul_post=fuse_mul_post, config=config)
    config = _forward_config(config, autotune, dims, X, W, m_sizes, gather_indices, topk,
                             permute_x, permute_y, topk_weights, fuse_mul_post)
    y, _ = _ops.forward(X, W, m_sizes, gather_indices, topk_weights, topk, permute_x,
                        permute_y, fuse_mul_post, False, _ops.encode(config), _NO_CONFIG,
                        _NO_CONFIG)
    return y


def grouped_gemm_dX(dY: torch.Tensor, W: torch.Tensor, m_sizes: torch.Tensor,
                    gather_indices: torch.Tensor | None, topk: int, *, permute_x: bool = False,
                    permute_y: bool = False, config: DXConfig | None = None,
                    autotune: bool = False) -> torch.Tensor:
    """dX [M, K] = dY[row(p)] @ W[e(p)].

    permute_y: dY is in routed-row order, row p is read at gather_indices[p].
    permute_x: row p of dX is stored at gather_indices[p] (routed-row order; the
    differentiable op then sums each token's topk rows).
    """
    dims = v.check_dX(dY, W, m_sizes, gather_indices, topk, permute_x=permute_x,
                      permute_y=permute_y, config=config)
    config = _dx_config(config, autotune, dims, dY, W, m_sizes, gather_indices, topk,
                        permute_x, permute_y)
    return _ops.dx(dY, W, m_sizes, gather_indices, topk, permute_x, permute_y,
                   _ops.encode(config))


def grouped_gemm_dW(X: torch.Tensor, dY: torch.Tensor, m_sizes: torch.Tensor,
                    gather_indices: torch.Tensor | None, topk: int, *, permute_x: bool = False,
                    permute_y: bool = False, config: DWConfig | None = None,
                    autotune: bool = False) -> torch.Tensor:
    """dW [E, N, K]: dW[e] = sum over the expert's positions p of dY[row]^T X[row];
    exactly zero for an expert with no rows. Gather rules as in forward / dX."""
    dims = v.check_dW(X, dY, m_sizes, gather_indices, topk, permute_x=permute_x,
                      permute_y=permute_y, config=config)
    config = _dw_config(config, autotune, dims, X, dY, m_sizes, gather_indices, topk,
                        permute_x, permute_y)
    return _ops.dw(X, dY, m_sizes, gather_indices, topk, permute_x, permute_y,
                   _ops.encode(config), False)


def grouped_gemm(X: torch.Tensor, W: torch.Tensor, m_sizes: torch.Tensor,
                 gather_indices: torch.Tensor | None, topk: int, *, permute_x: bool = False,
                 permute_y: bool = False, topk_weights: torch.Tensor | None = None,
                 fuse_mul_post: bool = False, forward_config: ForwardConfig | None = None,
                 dx_config: DXConfig | None = None, dw_config: DWConfig | None = None,
                 autotune: bool = False) -> torch.Tensor:
    """The differentiable grouped GEMM (a registered torch custom op; compiles with
    torch.compile(fullgraph=True)). Same semantics as ``grouped_gemm_forward``.

    Gradients: X ([T, K] with permute_x: each token's topk routed copies summed), W, and
    with fuse_mul_post topk_weights (d topk_weights[r] = <dY[r], Y_unweighted[r]>).
    Without fuse_mul_post topk_weights is not read and gets no gradient.
    """
    dims = v.check_forward(X, W, m_sizes, gather_indices, topk, permute_x=permute_x,
                           permute_y=permute_y, topk_weights=topk_weights,
                           fuse_mul_post=fuse_mul_post, config=forward_config)
    for op, cfg in (("dX", dx_config), ("dW", dw_config)):
        if cfg is not None:
            v.check_config(op, cfg, permute_x=permute_x, permute_y=permute_y, dtype=X.dtype)
    forward_config = _forward_config(forward_config, autotune, dims, X, W, m_sizes,
                                     gather_indices, topk, permute_x, permute_y, topk_weights,
                                     fuse_mul_post)
    if autotune:
        dx_config, dw_config = _backward_configs(dx_config, dw_config, dims, X, W, m_sizes,
                                                 gather_indices, topk, permute_x, permute_y)
    dx_config = dx_config or _looked_up("dX", dims, X, permute_x, permute_y)
    dw_config = dw_config or _looked_up("dW", dims, X, permute_x, permute_y)
    store_unweighted = bool(fuse_mul_post and topk_weights is not None
                            and topk_weights.requires_grad and torch.is_grad_enabled())
    return _ops.grouped_gemm(X, W, m_sizes, gather_indices, topk_weights, topk, permute_x,
                             permute_y, fuse_mul_post, store_unweighted,
                             _ops.encode(forward_config), _ops.encode(dx_config),
                             _ops.encode(dw_config))


def _looked_up(op, dims, X, permute_x, permute_y):
    """The cached, shipped or default config of a backward op (``autotune.lookup``)."""
    return autotune.lookup(autotune.key_for(op, dims, X.dtype, X.device, permute_x=permute_x,
                                            permute_y=permute_y))


def tuning_probe(shape, like: torch.Tensor) -> torch.Tensor:
    """A random operand to time candidates on (values do not change the speed), drawn from
    a generator of its own: tuning inside a user's step must not move the user's random
    stream."""
    gen = torch.Generator(device=like.device).manual_seed(0)
    return torch.randn(shape, generator=gen, dtype=like.dtype, device=like.device)


def _backward_configs(dx_config, dw_config, dims, X, W, m_sizes, gather, topk, permute_x,
                      permute_y):
    """dX and dW configs for autotune=True, known before the backward runs: cached choices,
    else (on a GPU, outside tracing) tuned on a random dY of the right shape, whose values
    do not change the speed. The probe is drawn only when a choice is missing."""
    flags = dict(permute_x=permute_x, permute_y=permute_y)
    dx_config = dx_config or autotune.cached(autotune.key_for("dX", dims, X.dtype, X.device,
                                                              **flags))
    dw_config = dw_config or autotune.cached(autotune.key_for("dW", dims, X.dtype, X.device,
                                                              **flags))
    if (dx_config and dw_config) or not X.is_cuda or torch.compiler.is_compiling():
        return dx_config, dw_config
    probe = tuning_probe((dims.m, dims.n), X)
    dx_config = dx_config or _dx_config(None, True, dims, probe, W, m_sizes, gather, topk,
                                        permute_x, permute_y)
    dw_config = dw_config or _dw_config(None, True, dims, X, probe, m_sizes, gather, topk,
                                        permute_x, permute_y)
    return dx_config, dw_config
