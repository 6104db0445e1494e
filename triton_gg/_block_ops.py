"""The MoE block's own differentiable pieces, as registered custom ops (torch.compile traces
them) with an eager autograd.Function path that skips the dispatcher, like ``_ops``:

* ``swiglu_gemm``: the first GEMM (persistent forward kernel) and SiLU-gating in one pass
  after it -> (H [M, 2I], A [M, I]); backward: one fused pass dA -> dH, then the dX and dW
  kernels on dH.
* ``combine``: out [T, H] = sum_j w[t, j] * Y[pos[t*k + j]] over the second GEMM's
  expert-order output; backward: dY (expert order) and d w in one pass.

Arguments are validated by ``triton_gg.moe`` before they get here.
"""

from __future__ import annotations

import torch

from triton_gg import _ops
from triton_gg.kernels.combine import launch_combine, launch_combine_backward
from triton_gg.kernels.swiglu_backward import launch_swiglu_backward
from triton_gg.kernels.forward import launch_forward
from triton_gg.kernels.silu_mul import launch_silu_mul


# ---------------------------------------------------------------------------- swiglu_gemm

def swiglu_gemm_impl(x, w, m_sizes, gather, topk, permute_x, forward_config):
    """H by the persistent forward GEMM, then A = silu(gate) * up in one pass. (A fused
    epilogue on the one-tile-per-program GEMM measured 10-25% slower on the H200; the
    persistent GEMM with that epilogue slower still: benchmarks/NOTES.md step 13.)"""
    m = gather.shape[0] if permute_x else x.shape[0]
    two_i = w.shape[1]
    h = torch.empty((m, two_i), dtype=x.dtype, device=x.device)
    a = torch.empty((m, two_i // 2), dtype=x.dtype, device=x.device)
    m_sizes = m_sizes.contiguous()
    launch_forward(x.contiguous(), w, m_sizes, None if gather is None else gather.contiguous(),
                   None, h, h, topk=topk, permute_x=permute_x, permute_y=False,
                   fuse_mul_post=False, store_unweighted=False,
                   config=_ops.decode_forward(forward_config))
    launch_silu_mul(h, a, m_sizes)
    return h, a


@torch.library.custom_op("triton_gg::swiglu_gemm", mutates_args=())
def swiglu_gemm_op(x: torch.Tensor, w: torch.Tensor, m_sizes: torch.Tensor,
                   gather: torch.Tensor | None, topk: int, permute_x: bool,
                   forward_config: list[int], dx_config: list[int],
                   dw_config: list[int], pos: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H [M, 2I], A = silu(H[:, :I]) * H[:, I:] [M, I]); dx/dw configs and the positions
    (inverse of gather, from the routing: the backward's combine pass reads them) ride
    along."""
    return swiglu_gemm_impl(x, w, m_sizes, gather, topk, permute_x, forward_config)


@swiglu_gemm_op.register_fake
def _(x, w, m_sizes, gather, topk, permute_x, forward_config, dx_config, dw_config, pos=None):
    m = gather.shape[0] if permute_x else x.shape[0]
    return x.new_empty((m, w.shape[1])), x.new_empty((m, w.shape[1] // 2))


def _swiglu_setup(ctx, inputs, output):
    x, w, m_sizes, gather, topk, permute_x, _, dx_config, dw_config, pos = _padded(inputs)
    ctx.topk, ctx.permute_x, ctx.tokens = topk, permute_x, x.shape[0]
    ctx.dx_config, ctx.dw_config, ctx.num_inputs = dx_config, dw_config, len(inputs)
    ctx.save_for_backward(x, w, m_sizes, gather, pos, output[0])


def swiglu_backward_impl(h, da, m_sizes):
    """dH [M, 2I] of A = silu(gate) * up, from dA [M, I] (one fused pass); rows past
    sum(m_sizes) (dropped slots, which no GEMM reads) are left unwritten."""
    h = h.contiguous()
    return launch_swiglu_backward(h, da.contiguous(),
                                  torch.empty(h.shape, dtype=h.dtype, device=h.device),
                                  m_sizes.contiguous())


@torch.library.custom_op("triton_gg::swiglu_backward", mutates_args=())
def swiglu_backward_op(h: torch.Tensor, da: torch.Tensor, m_sizes: torch.Tensor
                       ) -> torch.Tensor:
    return swiglu_backward_impl(h, da, m_sizes)


@swiglu_backward_op.register_fake
def _(h, da, m_sizes):
    return torch.empty_like(h)


def _swiglu_backward(ctx, grad_h, grad_a, *, run_dx=_ops.dx_op, run_dw=_ops.dw_op,
                     run_act=swiglu_backward_op):
    """The registered (traceable) backward runs custom ops; the eager Function passes the
    plain implementations."""
    x, w, m_sizes, gather, pos, h = ctx.saved_tensors
    dh = run_act(h, grad_a, m_sizes) if grad_a is not None else torch.zeros_like(h)
    if grad_h is not None:
        dh = dh + grad_h
    return _dx_dw(ctx, dh, x, w, m_sizes, gather, pos, run_dx=run_dx, run_dw=run_dw,
                  run_combine=combine_op)


def inverse_permutation(gather: torch.Tensor) -> torch.Tensor:
    """pos[r]: the expert-order position of routed row r (gather is a permutation)."""
    pos = torch.empty_like(gather)
    pos[gather.long()] = torch.arange(gather.shape[0], dtype=gather.dtype,
                                      device=gather.device)
    return pos


def _padded(inputs):
    """The ops' inputs with the optional trailing pos (None when not given)."""
    return tuple(inputs) + (None,) * (10 - len(inputs))


def _dx_dw(ctx, dh, x, w, m_sizes, gather, pos, *, run_dx, run_dw, run_combine):
    """(dX, dW, None...) of the first GEMM from dH; pos (the routing's inverse of gather)
    is recomputed only where the caller had none."""
    d_x = d_w = None
    if ctx.needs_input_grad[1]:  # first: its gathered copy of X is freed before dX allocates
        d_w = _ops.dw_with_gather(run_dw, x, dh, m_sizes, gather, ctx.topk, ctx.permute_x,
                                  False, ctx.dw_config)
    if ctx.needs_input_grad[0]:
        # dX in expert order, then each token's k rows summed by the combine pass, which
        # skips rows past sum(m_sizes): the block drops routing slots of other ranks'
        # experts there, and no GEMM writes their rows
        d_x = run_dx(dh, w, m_sizes, gather, ctx.topk, False, False, ctx.dx_config)
        if ctx.permute_x:
            ones = torch.ones(gather.shape[0], dtype=torch.float32, device=d_x.device)
            if pos is None:
                pos = inverse_permutation(gather)
            d_x = run_combine(d_x, ones, pos, m_sizes, ctx.topk)
    return (d_x, d_w) + (None,) * (ctx.num_inputs - 2)


swiglu_gemm_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


class _EagerSwigluGemm(torch.autograd.Function):
    """Eager path, returning A only. H is saved with save_for_backward (so checkpointing and
    saved-tensor hooks see it) and the backward writes dH over it in place: each element of
    dH needs only the gate and up values at its own position, and dropping the separate dH
    buffer (2 bytes x M x 2I: 0.2 GB at Qwen3-30B-A3B, T=8192) keeps the block's backward
    peak under the torch._grouped_mm block's while dW's gathered copy of X is alive. A
    second backward through the same graph (retain_graph) then fails autograd's version
    check with its usual error instead of reading dH as H."""

    @staticmethod
    def forward(ctx, *inputs):
        h, a = swiglu_gemm_impl(*inputs[:6], inputs[6])
        _swiglu_setup(ctx, inputs, (h, a))
        return a

    @staticmethod
    def backward(ctx, grad_a):
        x, w, m_sizes, gather, pos, h = ctx.saved_tensors
        dh = launch_swiglu_backward(h, grad_a.contiguous(), h,  # in place: dH over H
                                    m_sizes.contiguous())
        torch.autograd.graph.increment_version(h)  # the kernel's write, made visible
        return _dx_dw(ctx, dh, x, w, m_sizes, gather, pos, run_dx=_ops.dx_impl,
                      run_dw=_ops.dw_impl, run_combine=combine_impl)


def swiglu_gemm(*inputs) -> torch.Tensor:
    """Differentiable A = silu(gate) * up of the first GEMM; inputs as swiglu_gemm_op's."""
    if torch.compiler.is_compiling():
        return swiglu_gemm_op(*inputs)[1]
    return _EagerSwigluGemm.apply(*inputs)


# ---------------------------------------------------------------------------- gather_gemm

def gather_gemm_impl(x, w, m_sizes, gather, topk, permute_x, forward_config):
    return _ops.forward_impl(x, w, m_sizes, gather, None, topk, permute_x, False, False, False,
                             forward_config)[0]


@torch.library.custom_op("triton_gg::gather_gemm", mutates_args=())
def gather_gemm_op(x: torch.Tensor, w: torch.Tensor, m_sizes: torch.Tensor,
                   gather: torch.Tensor | None, topk: int, permute_x: bool,
                   forward_config: list[int], dx_config: list[int],
                   dw_config: list[int], pos: torch.Tensor | None = None) -> torch.Tensor:
    """H [M, N] = X[gather // topk] @ W[e].T in expert order (the first GEMM of a block whose
    activation runs outside it); dx/dw configs and the positions ride along."""
    return gather_gemm_impl(x, w, m_sizes, gather, topk, permute_x, forward_config)


@gather_gemm_op.register_fake
def _(x, w, m_sizes, gather, topk, permute_x, forward_config, dx_config, dw_config, pos=None):
    return x.new_empty((gather.shape[0] if permute_x else x.shape[0], w.shape[1]))


def _gather_gemm_setup(ctx, inputs, output):
    x, w, m_sizes, gather, topk, permute_x, _, dx_config, dw_config, pos = _padded(inputs)
    ctx.topk, ctx.permute_x = topk, permute_x
    ctx.dx_config, ctx.dw_config, ctx.num_inputs = dx_config, dw_config, len(inputs)
    ctx.save_for_backward(x, w, m_sizes, gather, pos)


def _gather_gemm_backward(ctx, grad_h, *, run_dx=_ops.dx_op, run_dw=_ops.dw_op,
                          run_combine=None):
    """The backward of the fused path's first GEMM without its activation: rows past
    sum(m_sizes) (dropped slots) are neither read nor needed."""
    x, w, m_sizes, gather, pos = ctx.saved_tensors
    return _dx_dw(ctx, grad_h.contiguous(), x, w, m_sizes, gather, pos, run_dx=run_dx,
                  run_dw=run_dw, run_combine=run_combine or combine_op)


gather_gemm_op.register_autograd(_gather_gemm_backward, setup_context=_gather_gemm_setup)


class _EagerGatherGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        h = gather_gemm_impl(*inputs[:7])
        _gather_gemm_setup(ctx, inputs, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        return _gather_gemm_backward(ctx, grad_h, run_dx=_ops.dx_impl, run_dw=_ops.dw_impl,
                                     run_combine=combine_impl)


def gather_gemm(*inputs) -> torch.Tensor:
    """Differentiable H of the first GEMM (gather on load, expert order) whose backward
    sums dX per token with the combine pass, like ``swiglu_gemm``'s: the block can drop
    routing slots (rows past sum(m_sizes) are never written or read) on this path too.
    Inputs as gather_gemm_op's."""
    if torch.compiler.is_compiling():
        return gather_gemm_op(*inputs)
    return _EagerGatherGemm.apply(*inputs)


# ---------------------------------------------------------------------------- combine

def combine_impl(y, weights, pos, m_sizes, topk):
    tokens = pos.shape[0] // topk if topk else 0
    out = torch.empty((tokens, y.shape[1]), dtype=y.dtype, device=y.device)
    return launch_combine(y.contiguous(), weights.contiguous(), pos.contiguous(),
                          m_sizes.contiguous(), out, topk=topk)


@torch.library.custom_op("triton_gg::combine", mutates_args=())
def combine_op(y: torch.Tensor, weights: torch.Tensor, pos: torch.Tensor,
               m_sizes: torch.Tensor, topk: int) -> torch.Tensor:
    """out [T, H] = sum_j weights[t*k + j] * y[pos[t*k + j]], skipping positions
    >= sum(m_sizes) (rows no GEMM wrote: dropped routing slots)."""
    return combine_impl(y, weights, pos, m_sizes, topk)


@combine_op.register_fake
def _(y, weights, pos, m_sizes, topk):
    return y.new_empty((pos.shape[0] // topk if topk else 0, y.shape[1]))


def _combine_setup(ctx, inputs, output):
    y, weights, pos, m_sizes, topk = inputs
    ctx.topk = topk
    ctx.save_for_backward(y, weights, pos, m_sizes)


def combine_backward_impl(y, weights, pos, m_sizes, d_out, topk, need_weights):
    y, weights, pos = y.contiguous(), weights.contiguous(), pos.contiguous()
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    d_weights = (torch.empty(weights.shape, dtype=weights.dtype, device=weights.device)
                 if need_weights else None)
    launch_combine_backward(y, weights, pos, m_sizes.contiguous(), d_out.contiguous(), dy,
                            d_weights, topk=topk)
    return dy, d_weights


@torch.library.custom_op("triton_gg::combine_backward", mutates_args=())
def combine_backward_op(y: torch.Tensor, weights: torch.Tensor, pos: torch.Tensor,
                        m_sizes: torch.Tensor, d_out: torch.Tensor, topk: int,
                        need_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dy, d_weights = combine_backward_impl(y, weights, pos, m_sizes, d_out, topk, need_weights)
    return dy, d_weights if d_weights is not None else weights.new_empty((0,))


@combine_backward_op.register_fake
def _(y, weights, pos, m_sizes, d_out, topk, need_weights):
    return torch.empty_like(y), weights.new_empty(weights.shape if need_weights else (0,))


def _combine_backward(ctx, d_out, *, run=combine_backward_op):
    """The registered (traceable) backward runs the custom op; the eager Function passes
    the plain implementation."""
    y, weights, pos, m_sizes = ctx.saved_tensors
    need_weights = ctx.needs_input_grad[1]
    dy, d_weights = run(y, weights, pos, m_sizes, d_out, ctx.topk, need_weights)
    return dy, (d_weights if need_weights else None), None, None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


class _EagerCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        out = combine_impl(*inputs)
        _combine_setup(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, d_out):
        return _combine_backward(ctx, d_out, run=combine_backward_impl)


def combine(y, weights, pos, m_sizes, topk) -> torch.Tensor:
    """Differentiable top-k combine; see combine_op."""
    if torch.compiler.is_compiling():
        return combine_op(y, weights, pos, m_sizes, topk)
    return _EagerCombine.apply(y, weights, pos, m_sizes, topk)
