"""A float64 torch reference of the contract, beside the kernels.

The same math as ``gg_spec.reference`` (whose numpy version is the ground truth; a test
checks that the two agree), on any device: GPU tests at real model shapes compute their
reference on the GPU, where float64 numpy on the host would take minutes.
"""

from __future__ import annotations

import torch


def _expert_order(a, gather, topk, *, token_rows: bool, routed_rows: bool):
    if token_rows:
        return a[gather.long() // topk]
    if routed_rows:
        return a[gather.long()]
    return a


def _scatter(a_exp, gather):
    out = torch.zeros_like(a_exp)
    out[gather.long()] = a_exp
    return out


def _segments(m_sizes):
    ends = torch.cumsum(m_sizes.long(), 0).tolist()
    starts = [0] + ends[:-1]
    return list(zip(range(len(ends)), starts, ends))


def forward(x, w, m_sizes, gather, topk, *, permute_x=False, permute_y=False,
            topk_weights=None, fuse_mul_post=False):
    x, w = x.double(), w.double()
    x_exp = _expert_order(x, gather, topk, token_rows=permute_x, routed_rows=False)
    y = x.new_zeros((int(m_sizes.sum()), w.shape[1]))
    for e, lo, hi in _segments(m_sizes):
        if hi > lo:
            y[lo:hi] = x_exp[lo:hi] @ w[e].T
    if fuse_mul_post:
        y = y * topk_weights.double()[gather.long()][:, None]
    return _scatter(y, gather) if permute_y else y


def dX(dy, w, m_sizes, gather, topk, *, permute_x=False, permute_y=False):
    dy, w = dy.double(), w.double()
    dy_exp = _expert_order(dy, gather, topk, token_rows=False, routed_rows=permute_y)
    dx = dy.new_zeros((int(m_sizes.sum()), w.shape[2]))
    for e, lo, hi in _segments(m_sizes):
        if hi > lo:
            dx[lo:hi] = dy_exp[lo:hi] @ w[e]
    return _scatter(dx, gather) if permute_x else dx


def dW(x, dy, m_sizes, gather, topk, *, permute_x=False, permute_y=False):
    x, dy = x.double(), dy.double()
    x_exp = _expert_order(x, gather, topk, token_rows=permute_x, routed_rows=False)
    dy_exp = _expert_order(dy, gather, topk, token_rows=False, routed_rows=permute_y)
    dw = x.new_zeros((m_sizes.shape[0], dy.shape[1], x.shape[1]))
    for e, lo, hi in _segments(m_sizes):
        if hi > lo:
            dw[e] = dy_exp[lo:hi].T @ x_exp[lo:hi]
    return dw


def grouped_gemm_grads(x, w, m_sizes, gather, topk, dy, *, permute_x=False, permute_y=False,
                       topk_weights=None, fuse_mul_post=False):
    """(dX, dW, d_topk_weights) of the differentiable op, as gg_spec.reference."""
    dy = dy.double()
    d_weights = None
    if fuse_mul_post:
        y_unweighted = forward(x, w, m_sizes, gather, topk, permute_x=permute_x,
                               permute_y=permute_y)
        tw = topk_weights.double()
        row_scale = tw if permute_y else tw[gather.long()]
        per_row = (dy * y_unweighted).sum(1)
        if permute_y:
            d_weights = per_row
        else:
            d_weights = torch.zeros_like(tw)
            d_weights[gather.long()] = per_row
        dy = dy * row_scale[:, None]
    dx = dX(dy, w, m_sizes, gather, topk, permute_x=permute_x, permute_y=permute_y)
    if permute_x:
        dx = dx.view(-1, topk, dx.shape[1]).sum(1)
    dw = dW(x, dy, m_sizes, gather, topk, permute_x=permute_x, permute_y=permute_y)
    return dx, dw, d_weights
