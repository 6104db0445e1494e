"""The kernels as registered torch custom ops, so that torch.compile(fullgraph=True) traces
through them (forward and backward) without graph breaks, and the autograd formula.

Configs travel through the op schema as int lists (custom ops take only simple types).
Arguments reaching these ops are already validated by the public functions.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from gg_spec import DWConfig, DXConfig, ForwardConfig
from triton_gg.kernels.dw import launch_dw
from triton_gg.kernels.dx import launch_dx
from triton_gg.kernels.forward import launch_forward


@functools.lru_cache(maxsize=256)
def _encode(config) -> tuple[int, ...]:
    return tuple(int(getattr(config, f.name)) for f in dataclasses.fields(config))


def encode(config) -> list[int]:
    """A config as the int list the op schema carries."""
    return list(_encode(config))


def _decoder(cls):
    names = [f.name for f in dataclasses.fields(cls)]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    cache: dict[tuple, object] = {}

    def decode(values):
        key = tuple(values)
        if key not in cache:
            cache[key] = cls(**{n: (bool(v) if types[n] in (bool, "bool") else int(v))
                                for n, v in zip(names, key)})
        return cache[key]
    return decode


decode_forward = _decoder(ForwardConfig)
decode_dx = _decoder(DXConfig)
decode_dw = _decoder(DWConfig)


def _rows_out(x, gather, permute_x):
    return gather.shape[0] if permute_x else x.shape[0]


# ---------------------------------------------------------------------------- forward

def forward_impl(x, w, m_sizes, gather_indices, topk_weights, topk, permute_x, permute_y,
                 fuse_mul_post, store_unweighted, forward_config):
    """Allocate and launch: (Y [M, N], Y_unweighted [M, N] or [0, N])."""
    m, n = _rows_out(x, gather_indices, permute_x), w.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    store_unweighted = store_unweighted and fuse_mul_post
    y_unweighted = (torch.empty((m, n), dtype=x.dtype, device=x.device) if store_unweighted
                    else y.new_empty((0, n)))
    launch_forward(x.contiguous(), w, m_sizes.contiguous(),
                   None if gather_indices is None else gather_indices.contiguous(),
                   None if topk_weights is None else topk_weights.contiguous(),
                   y, y_unweighted, topk=topk, permute_x=permute_x, permute_y=permute_y,
                   fuse_mul_post=fuse_mul_post, store_unweighted=store_unweighted,
                   config=decode_forward(forward_config))
    return y, y_unweighted


@torch.library.custom_op("triton_gg::forward", mutates_args=())
def forward_op(x: torch.Tensor, w: torch.Tensor, m_sizes: torch.Tensor,
               gather_indices: torch.Tensor | None, topk_weights: torch.Tensor | None,
               topk: int, permute_x: bool, permute_y: bool, fuse_mul_post: bool,
               store_unweighted: bool, forward_config: list[int], dx_config: list[int],
               dw_config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y [M, N], Y_unweighted [M, N] or [0, N]). dx/dw configs ride along for backward."""
    return forward_impl(x, w, m_sizes, gather_indices, topk_weights, topk, permute_x,
                        permute_y, fuse_mul_post, store_unweighted, forward_config)


@forward_op.register_fake
def _(x, w, m_sizes, gather_indices, topk_weights, topk, permute_x, permute_y, fuse_mul_post,
      store_unweighted, forward_config, dx_config, dw_config):
    m, n = _rows_out(x, gather_indices, permute_x), w.shape[1]
    keep = store_unweighted and fuse_mul_post
    return x.new_empty((m, n)), x.new_empty((m if keep else 0, n))


# ---------------------------------------------------------------------------- dX, dW

def dx_impl(dy, w, m_sizes, gather_indices, topk, permute_x, permute_y, config):
    """Allocate and launch: dX [M, K] (routed-row order with permute_x)."""
    dx = torch.empty((dy.shape[0], w.shape[2]), dtype=dy.dtype, device=dy.device)
    launch_dx(dy.contiguous(), w, m_sizes.contiguous(),
              None if gather_indices is None else gather_indices.contiguous(), dx,
              permute_x=permute_x, permute_y=permute_y, config=decode_dx(config))
    return dx


@torch.library.custom_op("triton_gg::dx", mutates_args=())
def dx_op(dy: torch.Tensor, w: torch.Tensor, m_sizes: torch.Tensor,
          gather_indices: torch.Tensor | None, topk: int, permute_x: bool, permute_y: bool,
          config: list[int]) -> torch.Tensor:
    """dX [M, K] (routed-row order with permute_x)."""
    return dx_impl(dy, w, m_sizes, gather_indices, topk, permute_x, permute_y, config)


@dx_op.register_fake
def _(dy, w, m_sizes, gather_indices, topk, permute_x, permute_y, config):
    return dy.new_empty((dy.shape[0], w.shape[2]))


def dw_impl(x, dy, m_sizes, gather_indices, topk, permute_x, permute_y, config,
            transpose_out):
    """Allocate and launch: dW [E, N, K], or [E, K, N] with transpose_out."""
    e, n, k = m_sizes.shape[0], dy.shape[1], x.shape[1]
    if transpose_out:
        out = torch.empty((e, k, n), dtype=x.dtype, device=x.device)
        target = out.transpose(1, 2)
    else:
        out = target = torch.empty((e, n, k), dtype=x.dtype, device=x.device)
    launch_dw(x.contiguous(), dy.contiguous(), m_sizes.contiguous(),
              None if gather_indices is None else gather_indices.contiguous(), target,
              topk=topk, permute_x=permute_x, permute_y=permute_y, config=decode_dw(config))
    return out


@torch.library.custom_op("triton_gg::dw", mutates_args=())
def dw_op(x: torch.Tensor, dy: torch.Tensor, m_sizes: torch.Tensor,
          gather_indices: torch.Tensor | None, topk: int, permute_x: bool, permute_y: bool,
          config: list[int], transpose_out: bool) -> torch.Tensor:
    """dW [E, N, K], or [E, K, N] with transpose_out (grouped_mm's weight layout)."""
    return dw_impl(x, dy, m_sizes, gather_indices, topk, permute_x, permute_y, config,
                   transpose_out)


# Eager calls skip the custom-op dispatcher (tens of microseconds a call, which shows next to
# kernels of a few hundred); under torch.compile the registered ops are what gets traced.

def dx(*args):
    return dx_op(*args) if torch.compiler.is_compiling() else dx_impl(*args)


def dw(*args):
    return dw_op(*args) if torch.compiler.is_compiling() else dw_impl(*args)


def forward(*args):
    """Non-differentiable forward: (Y, Y_unweighted); args as forward_op's."""
    if torch.compiler.is_compiling():
        return forward_op(*args)
    return forward_impl(*args[:10], args[10])


@dw_op.register_fake
def _(x, dy, m_sizes, gather_indices, topk, permute_x, permute_y, config, transpose_out):
    e, n, k = m_sizes.shape[0], dy.shape[1], x.shape[1]
    return x.new_empty((e, k, n) if transpose_out else (e, n, k))


# ---------------------------------------------------------------------------- autograd

def in_range(gather: torch.Tensor, rows: int) -> torch.Tensor:
    """The gather indices as int64, clamped into [0, rows): torch's own indexing of a bad
    index is a device-side assert that ends the process, the kernels' a wrong row (the
    contract: wrong routing values give wrong numbers, never an access outside a tensor)."""
    return gather.long().clamp(0, max(rows - 1, 0))


def dw_gathers_x(x: torch.Tensor) -> bool:
    """Does ``dw_with_gather`` copy a token-order X into expert order first (and run dW
    unfused)? On a GPU, yes; the interpreter keeps the fused gather (it measures nothing)."""
    return x.is_cuda


def dw_with_gather(run_dw, x, dy, m_sizes, gather, topk, permute_x, permute_y, config):
    """dW [E, N, K]. On a GPU a token-order X (permute_x) is first gathered into expert order
    by one copy: the dW kernel reduces over rows, and rows gathered one by one inside it ran
    at 0.64x of contiguous ones on the H200 (1.51 vs 0.96 ms, Qwen3-30B-A3B gate_up at
    T=8192), more than the copy costs. The copy lives only for this call."""
    if permute_x and dw_gathers_x(x):
        x = x.index_select(0, torch.div(in_range(gather, x.shape[0] * topk), topk,
                                        rounding_mode="floor"))
        permute_x = False
    return run_dw(x, dy, m_sizes, gather, topk, permute_x, permute_y, config, False)


def _setup_context(ctx, inputs, output):
    (x, w, m_sizes, gather, topk_weights, topk, permute_x, permute_y, fuse_mul_post,
     store_unweighted, _, dx_config, dw_config) = inputs
    ctx.topk, ctx.permute_x, ctx.permute_y = topk, permute_x, permute_y
    ctx.fuse_mul_post = fuse_mul_post
    ctx.dx_config, ctx.dw_config = dx_config, dw_config
    ctx.tokens = x.shape[0]
    y_unweighted = output[1]
    ctx.save_for_backward(x, w, m_sizes, gather, topk_weights,
                          y_unweighted if store_unweighted else None)


def _backward(ctx, grad_y, _grad_y_unweighted, *, run_dx=dx_op, run_dw=dw_op):
    """Gradients of forward_op. The registered (traceable) backward runs the custom ops;
    the eager autograd.Function passes the plain implementations."""
    x, w, m_sizes, gather, topk_weights, y_unweighted = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_weights = ctx.fuse_mul_post and ctx.needs_input_grad[4]
    dy = grad_y.contiguous()
    d_weights = None
    if ctx.fuse_mul_post:
        # Y[row] = s(row) * Y_unweighted[row]: the weight of each row of Y, in Y's row order
        rows = None if ctx.permute_y else in_range(gather, topk_weights.shape[0])
        row_scale = topk_weights if ctx.permute_y else topk_weights[rows]
        if need_weights:
            if y_unweighted is None:
                raise RuntimeError("topk_weights needs a gradient, but the forward did not "
                                   "keep Y_unweighted (topk_weights.requires_grad was False)")
            # one elementwise pass and an fp32-accumulated row sum; no fp32 copies of [M, N]
            per_row = (dy * y_unweighted).sum(dim=1, dtype=torch.float32)
            if ctx.permute_y:
                d_weights = per_row.to(topk_weights.dtype)
            else:
                d_weights = torch.zeros_like(topk_weights).index_copy(
                    0, rows, per_row.to(topk_weights.dtype))
        # the product is formed in fp32 and rounded once to dY's dtype, as before, in one pass
        dy = torch.mul(dy, row_scale[:, None]).to(dy.dtype)
    d_x = d_w = None
    if need_w:  # first: a gathered copy of X (dw_with_gather) is freed before dX allocates
        d_w = dw_with_gather(run_dw, x, dy, m_sizes, gather, ctx.topk, ctx.permute_x,
                             ctx.permute_y, ctx.dw_config)
    if need_x:
        d_x = run_dx(dy, w, m_sizes, gather, ctx.topk, ctx.permute_x, ctx.permute_y,
                     ctx.dx_config)
        if ctx.permute_x:  # sum the k routed copies of each token
            d_x = d_x.view(ctx.tokens, ctx.topk, d_x.shape[1]).sum(dim=1)
    return (d_x, d_w, None, None, d_weights) + (None,) * 8


forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupedGemm(torch.autograd.Function):
    """The same op and backward for eager mode, without the custom-op dispatcher."""

    @staticmethod
    def forward(ctx, *inputs):
        y, y_unweighted = forward_impl(*inputs[:11])
        _setup_context(ctx, inputs, (y, y_unweighted))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _backward(ctx, grad_y, None, run_dx=dx_impl, run_dw=dw_impl)


def grouped_gemm(*inputs) -> torch.Tensor:
    """Differentiable Y; inputs as forward_op's."""
    if torch.compiler.is_compiling():
        return forward_op(*inputs)[0]
    return _EagerGroupedGemm.apply(*inputs)


# grouped_mm: out = a @ b[e] on row groups, b [E, K, N]; our W is b viewed as [E, N, K].
# Its weight gradient db[e] = a_e^T grad_e [K, N] is the dW kernel with the operands' roles
# swapped (dW[e] = dY_e^T X_e with dY := a, X := grad): a contiguous [E, K, N] written in
# row-major tiles (TMA store where the config asks). Writing a [E, N, K] dW through the
# transposed view instead stores every tile column by column, N elements apart.

@torch.library.custom_op("triton_gg::grouped_mm", mutates_args=())
def grouped_mm_op(a: torch.Tensor, b: torch.Tensor, m_sizes: torch.Tensor,
                  forward_config: list[int], dx_config: list[int],
                  dw_config: list[int]) -> torch.Tensor:
    y, _ = forward_op(a, b.transpose(1, 2), m_sizes, None, None, 1, False, False, False, False,
                      forward_config, dx_config, dw_config)
    return y


@grouped_mm_op.register_fake
def _(a, b, m_sizes, forward_config, dx_config, dw_config):
    return a.new_empty((a.shape[0], b.shape[2]))


def _mm_setup(ctx, inputs, output):
    a, b, m_sizes, _, dx_config, dw_config = inputs
    ctx.dx_config, ctx.dw_config = dx_config, dw_config
    ctx.save_for_backward(a, b, m_sizes)


def _mm_backward(ctx, grad_out, *, run_dx=dx_op, run_dw=dw_op):
    """Gradients of grouped_mm_op: the custom ops when traced, the plain implementations
    from the eager autograd.Function."""
    a, b, m_sizes = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    da = db = None
    if ctx.needs_input_grad[0]:
        da = run_dx(grad_out, b.transpose(1, 2), m_sizes, None, 1, False, False,
                    ctx.dx_config)
    if ctx.needs_input_grad[1]:
        db = run_dw(grad_out, a, m_sizes, None, 1, False, False, ctx.dw_config, False)
    return da, db, None, None, None, None


grouped_mm_op.register_autograd(_mm_backward, setup_context=_mm_setup)


class _EagerGroupedMM(torch.autograd.Function):
    """grouped_mm_op's forward and backward for eager mode, without the custom-op
    dispatcher (two nested custom-op calls per step otherwise)."""

    @staticmethod
    def forward(ctx, a, b, m_sizes, forward_config, dx_config, dw_config):
        y, _ = forward_impl(a, b.transpose(1, 2), m_sizes, None, None, 1, False, False, False,
                            False, forward_config)
        _mm_setup(ctx, (a, b, m_sizes, forward_config, dx_config, dw_config), y)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        return _mm_backward(ctx, grad_out, run_dx=dx_impl, run_dw=dw_impl)


def grouped_mm(*inputs) -> torch.Tensor:
    """Differentiable a @ b[e] on row groups; inputs as grouped_mm_op's."""
    if torch.compiler.is_compiling():
        return grouped_mm_op(*inputs)
    return _EagerGroupedMM.apply(*inputs)
