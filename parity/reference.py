"""Float64 torch reference of the contract: ``gg_spec.reference``'s math on any torch device.

``gg_spec.reference`` (numpy) is the ground truth. This module computes the same thing with torch
in float64 where the inputs live, so the harness's device mode (``parity.device``) never brings a
real model's weights to the host: at real sizes the numpy reference needs minutes per case, this
one milliseconds on a GPU. ``tests/test_parity.py`` checks it against ``gg_spec.reference`` on CPU
for every fusion and the edge cases, which anchors the GPU ground truth to gg_spec.

Memory: W is upcast one expert at a time (no float64 copy of W ever exists) and matmuls write
into their slice of the output; the one large float64 buffer is dW's reference [E, N, K] itself.
X, dY and Y are [T|M, K|N] and cheap in float64.

Signatures follow ``gg_spec.reference``: tensors in any float dtype (computed in float64);
``m_sizes`` a numpy array, list or tensor (numpy avoids a device sync); ``gather_indices`` a
tensor on the inputs' device (or numpy, moved there).
"""

from __future__ import annotations

import numpy as np
import torch


def expert_bounds(m_sizes) -> list[tuple[int, int, int]]:
    """[(e, lo, hi)]: expert e owns expert-order positions [lo, hi)."""
    if isinstance(m_sizes, torch.Tensor):
        m_sizes = m_sizes.tolist()
    sizes = [int(s) for s in np.asarray(m_sizes).reshape(-1)]
    out, lo = [], 0
    for e, s in enumerate(sizes):
        out.append((e, lo, lo + s))
        lo += s
    return out


def _index(gather, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(gather, torch.Tensor):
        gather = torch.from_numpy(np.asarray(gather))
    return gather.to(device=like.device, dtype=torch.int64)


def _rows_in_expert_order(a, g, topk: int, *, token_rows: bool, routed_rows: bool):
    """Rows of `a` read in expert order, as float64: a[g//topk], a[g] or `a` itself."""
    if token_rows:
        a = a[g // topk]
    elif routed_rows:
        a = a[g]
    return a.to(torch.float64)


def _scatter_rows(a_exp, g):
    """out[g[p]] = a_exp[p]: expert order -> routed-row order."""
    out = torch.zeros_like(a_exp)
    out[g] = a_exp
    return out


def forward(x, w, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False,
            topk_weights=None, fuse_mul_post=False):
    """Y [M, N] float64: Y[p] = X[row(p)] @ W[e(p)].T, optionally scaled and scattered."""
    g = _index(gather_indices, x)
    bounds = expert_bounds(m_sizes)
    x_exp = _rows_in_expert_order(x, g, topk, token_rows=permute_x, routed_rows=False)
    m = bounds[-1][2] if bounds else 0
    y = torch.zeros((m, w.shape[1]), dtype=torch.float64, device=x.device)
    for e, lo, hi in bounds:
        if hi > lo:
            torch.matmul(x_exp[lo:hi], w[e].to(torch.float64).T, out=y[lo:hi])
    if fuse_mul_post:
        y *= topk_weights.to(torch.float64)[g][:, None]
    return _scatter_rows(y, g) if permute_y else y


def dX(dy, w, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False):
    """dX [M, K] float64: dX[p] = dY[row(p)] @ W[e(p)]; with permute_x stored at gather[p]."""
    g = _index(gather_indices, dy)
    bounds = expert_bounds(m_sizes)
    dy_exp = _rows_in_expert_order(dy, g, topk, token_rows=False, routed_rows=permute_y)
    m = bounds[-1][2] if bounds else 0
    dx = torch.zeros((m, w.shape[2]), dtype=torch.float64, device=dy.device)
    for e, lo, hi in bounds:
        if hi > lo:
            torch.matmul(dy_exp[lo:hi], w[e].to(torch.float64), out=dx[lo:hi])
    return _scatter_rows(dx, g) if permute_x else dx


def dW(x, dy, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False):
    """dW [E, N, K] float64: dW[e] = sum over p in e of dY[row(p)]^T X[row(p)]; zero for an
    empty expert."""
    g = _index(gather_indices, x)
    bounds = expert_bounds(m_sizes)
    x_exp = _rows_in_expert_order(x, g, topk, token_rows=permute_x, routed_rows=False)
    dy_exp = _rows_in_expert_order(dy, g, topk, token_rows=False, routed_rows=permute_y)
    dw = torch.zeros((len(bounds), dy.shape[1], x.shape[1]), dtype=torch.float64,
                     device=x.device)
    for e, lo, hi in bounds:
        if hi > lo:
            torch.matmul(dy_exp[lo:hi].T, x_exp[lo:hi], out=dw[e])
    return dw


def grouped_gemm_grads(x, w, m_sizes, gather_indices, topk, dy, *, permute_x=False,
                       permute_y=False, topk_weights=None, fuse_mul_post=False):
    """(dX, dW, d_topk_weights) of the differentiable op, exactly as
    ``gg_spec.reference.grouped_gemm_grads``: dX [T, K] with permute_x (the k routed copies of
    each token summed), else [M, K]; d_topk_weights [M] (routed-row order) or None."""
    dy = dy.to(torch.float64)
    g = _index(gather_indices, dy)
    d_weights = None
    if fuse_mul_post:
        y_unweighted = forward(x, w, m_sizes, g, topk, permute_x=permute_x,
                               permute_y=permute_y)
        tw = topk_weights.to(torch.float64)
        row_scale = tw if permute_y else tw[g]
        per_row = (dy * y_unweighted).sum(dim=1)
        del y_unweighted
        if permute_y:
            d_weights = per_row
        else:
            d_weights = torch.zeros_like(tw)
            d_weights[g] = per_row
        dy = dy * row_scale[:, None]
    dx = dX(dy, w, m_sizes, g, topk, permute_x=permute_x, permute_y=permute_y)
    if permute_x:
        dx = dx.reshape(-1, topk, dx.shape[1]).sum(dim=1)
    dw = dW(x, dy, m_sizes, g, topk, permute_x=permute_x, permute_y=permute_y)
    return dx, dw, d_weights


__all__ = ["dW", "dX", "expert_bounds", "forward", "grouped_gemm_grads"]
