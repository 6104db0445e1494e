"""Float64 numpy reference of the contract (DESIGN.md), the ground truth of every test.

All functions take numpy arrays (any float dtype; they compute in float64) and follow the
contract's signatures exactly. Shapes: X [M, K] (or [T, K] with permute_x), W [E, N, K],
m_sizes [E], gather_indices [M], topk_weights [M] in routed-row order.
"""

from __future__ import annotations

import numpy as np

from gg_spec.routing import expert_offsets


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _rows_in_expert_order(a: np.ndarray, gather_indices, topk: int, *, token_rows: bool,
                          routed_rows: bool) -> np.ndarray:
    """Rows of `a` read in expert order: a[gather//topk] (token order), a[gather] (routed
    order) or `a` itself (already in expert order)."""
    if token_rows:
        return a[np.asarray(gather_indices, dtype=np.int64) // topk]
    if routed_rows:
        return a[np.asarray(gather_indices, dtype=np.int64)]
    return a


def _scatter_rows(a_exp: np.ndarray, gather_indices) -> np.ndarray:
    """out[gather[p]] = a_exp[p]: expert order -> routed-row order."""
    out = np.zeros_like(a_exp)
    out[np.asarray(gather_indices, dtype=np.int64)] = a_exp
    return out


def _per_expert(m_sizes):
    offs = expert_offsets(m_sizes)
    return [(e, int(offs[e]), int(offs[e + 1])) for e in range(len(m_sizes))]


def forward(x, w, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False,
            topk_weights=None, fuse_mul_post=False) -> np.ndarray:
    """Y [M, N]: Y[p] = X[row(p)] @ W[e(p)].T, optionally scaled and scattered."""
    x, w = _f64(x), _f64(w)
    x_exp = _rows_in_expert_order(x, gather_indices, topk, token_rows=permute_x,
                                  routed_rows=False)
    y = np.zeros((int(np.sum(m_sizes)), w.shape[1]))
    for e, lo, hi in _per_expert(m_sizes):
        y[lo:hi] = x_exp[lo:hi] @ w[e].T
    if fuse_mul_post:
        y *= _f64(topk_weights)[np.asarray(gather_indices, dtype=np.int64)][:, None]
    return _scatter_rows(y, gather_indices) if permute_y else y


def dX(dy, w, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False) -> np.ndarray:
    """dX [M, K]: dX[p] = dY[row(p)] @ W[e(p)]; with permute_x stored at gather[p]."""
    dy, w = _f64(dy), _f64(w)
    dy_exp = _rows_in_expert_order(dy, gather_indices, topk, token_rows=False,
                                   routed_rows=permute_y)
    dx = np.zeros((int(np.sum(m_sizes)), w.shape[2]))
    for e, lo, hi in _per_expert(m_sizes):
        dx[lo:hi] = dy_exp[lo:hi] @ w[e]
    return _scatter_rows(dx, gather_indices) if permute_x else dx


def dW(x, dy, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False) -> np.ndarray:
    """dW [E, N, K]: dW[e] = sum over p in e of dY[row(p)]^T X[row(p)]; zero for empty e."""
    x, dy = _f64(x), _f64(dy)
    x_exp = _rows_in_expert_order(x, gather_indices, topk, token_rows=permute_x,
                                  routed_rows=False)
    dy_exp = _rows_in_expert_order(dy, gather_indices, topk, token_rows=False,
                                   routed_rows=permute_y)
    dw = np.zeros((len(m_sizes), dy.shape[1], x.shape[1]))
    for e, lo, hi in _per_expert(m_sizes):
        dw[e] = dy_exp[lo:hi].T @ x_exp[lo:hi]
    return dw


def grouped_gemm_grads(x, w, m_sizes, gather_indices, topk, dy, *, permute_x=False,
                       permute_y=False, topk_weights=None, fuse_mul_post=False):
    """Gradients of the differentiable op ``grouped_gemm`` for an upstream gradient dY.

    Returns ``(dX, dW, d_topk_weights)``: dX is [T, K] with permute_x (the k routed copies of
    each token summed) and [M, K] otherwise; d_topk_weights is None unless fuse_mul_post,
    else [M] in routed-row order with d_topk_weights[r] = <dY[r], Y_unweighted[r]>.
    """
    dy = _f64(dy)
    gather = np.asarray(gather_indices, dtype=np.int64)
    d_weights = None
    if fuse_mul_post:
        y_unweighted = forward(x, w, m_sizes, gather_indices, topk, permute_x=permute_x,
                               permute_y=permute_y)
        # routing weight of each row of Y, in Y's own row order
        row_scale = _f64(topk_weights) if permute_y else _f64(topk_weights)[gather]
        per_row = np.sum(dy * y_unweighted, axis=1)
        if permute_y:
            d_weights = per_row
        else:
            d_weights = np.zeros(len(topk_weights))
            d_weights[gather] = per_row
        dy = dy * row_scale[:, None]
    dx = dX(dy, w, m_sizes, gather_indices, topk, permute_x=permute_x, permute_y=permute_y)
    if permute_x:
        dx = dx.reshape(-1, topk, dx.shape[1]).sum(axis=1)
    dw = dW(x, dy, m_sizes, gather_indices, topk, permute_x=permute_x, permute_y=permute_y)
    return dx, dw, d_weights
