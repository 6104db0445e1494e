"""The JAX implementations: dense ceiling (XLA), jax.lax.ragged_dot, tokamax (when its
wheel is importable) and pallas_gg (defaults; tuned rows labelled). Inputs come from the torch tensors via DLPack."""

from __future__ import annotations

from typing import Callable, Iterator

from benchmarks.torch_impls import TorchInputs

JaxBench = tuple[str, str, Callable, tuple]  # (impl, op, jitted fn, args)


def backward_only(f: Callable, primals: tuple, dy):
    """(jitted fn, args) that run only the backward of f at primals: the VJP closure (a
    pytree of residuals) is built once, outside the timing, and passed in."""
    import jax
    _, vjp_fn = jax.vjp(f, *primals)
    return jax.jit(lambda fn, g: fn(g)), (vjp_fn, dy)


class JaxInputs:
    def __init__(self, inp: TorchInputs):
        import jax
        import jax.numpy as jnp

        def conv(t):
            return jax.dlpack.from_dlpack(t.contiguous())
        self.x_tokens, self.x, self.w = conv(inp.x_tokens), conv(inp.x), conv(inp.w)
        self.dy, self.dense_b = conv(inp.dy), conv(inp.dense_b)
        self.m_sizes, self.gather = conv(inp.m_sizes), conv(inp.gather)
        self.topk_weights = conv(inp.topk_weights)
        self.topk = inp.topk
        # ragged_dot and tokamax take rhs [G, K, N]: materialised once, outside the timing
        self.w_t = jnp.swapaxes(self.w, 1, 2).copy()


def dense(j: JaxInputs) -> Iterator[JaxBench]:
    import jax
    yield "dense_xla", "fwd", jax.jit(lambda a, b: a @ b), (j.x, j.dense_b)


def lax_ragged_dot(j: JaxInputs) -> Iterator[JaxBench]:
    import jax

    def fwd(x, w_t, sizes):
        return jax.lax.ragged_dot(x, w_t, sizes)

    yield "lax_ragged_dot", "fwd", jax.jit(fwd), (j.x, j.w_t, j.m_sizes)
    yield "lax_ragged_dot", "bwd", *backward_only(
        lambda a, b: jax.lax.ragged_dot(a, b, j.m_sizes), (j.x, j.w_t), j.dy)


def tokamax(j: JaxInputs) -> Iterator[JaxBench]:
    try:
        import tokamax as tk
    except ImportError:
        return
    import jax

    def fwd(x, w_t, sizes):
        return tk.ragged_dot(x, w_t, sizes, implementation="mosaic")

    yield "tokamax", "fwd", jax.jit(fwd), (j.x, j.w_t, j.m_sizes)
    yield "tokamax", "bwd", *backward_only(lambda a, b: fwd(a, b, j.m_sizes), (j.x, j.w_t),
                                           j.dy)


def pallas_gg_impls(j: JaxInputs, first_gemm: bool) -> Iterator[JaxBench]:
    """pallas_gg as a user calls it: the library's defaults (no config, no tuning call; the
    shipped tuned configs where the card and shape have them)."""
    import jax
    import pallas_gg

    topk = j.topk
    fused = dict(permute_x=True) if first_gemm else dict(permute_y=True)
    x_fused = j.x_tokens if first_gemm else j.x
    yield "pallas_gg", "fwd", jax.jit(lambda x, w, ms, g: pallas_gg.grouped_gemm_forward(
        x, w, ms, g, topk)), (j.x, j.w, j.m_sizes, j.gather)
    name = "pallas_gg_permute_x" if first_gemm else "pallas_gg_permute_y"
    yield name, "fwd", jax.jit(lambda x, w, ms, g: pallas_gg.grouped_gemm_forward(
        x, w, ms, g, topk, **fused)), (x_fused, j.w, j.m_sizes, j.gather)
    yield "pallas_gg", "dX", jax.jit(lambda dy, w, ms, g: pallas_gg.grouped_gemm_dX(
        dy, w, ms, g, topk)), (j.dy, j.w, j.m_sizes, j.gather)
    yield "pallas_gg", "dW", jax.jit(lambda x, dy, ms, g: pallas_gg.grouped_gemm_dW(
        x, dy, ms, g, topk)), (j.x, j.dy, j.m_sizes, j.gather)
    yield "pallas_gg", "bwd", *backward_only(lambda a, b: pallas_gg.grouped_gemm(
        a, b, j.m_sizes, j.gather, topk), (j.x, j.w), j.dy)


def pallas_gg_tuned_impls(j: JaxInputs) -> Iterator[JaxBench]:
    """Non-default: configs from ``pallas_gg.tune`` (labelled so in the rows)."""
    import jax
    import pallas_gg

    topk = j.topk
    plain = pallas_gg.tune(j.x, j.w, j.m_sizes, j.gather, topk)
    yield "pallas_gg_tuned", "fwd", jax.jit(lambda x, w, ms, g: pallas_gg.grouped_gemm_forward(
        x, w, ms, g, topk, config=plain["forward"])), (j.x, j.w, j.m_sizes, j.gather)
    yield "pallas_gg_tuned", "dX", jax.jit(lambda dy, w, ms, g: pallas_gg.grouped_gemm_dX(
        dy, w, ms, g, topk, config=plain["dX"])), (j.dy, j.w, j.m_sizes, j.gather)
    yield "pallas_gg_tuned", "dW", jax.jit(lambda x, dy, ms, g: pallas_gg.grouped_gemm_dW(
        x, dy, ms, g, topk, config=plain["dW"])), (j.x, j.dy, j.m_sizes, j.gather)


def pallas_gg_mosaic_impls(j: JaxInputs, first_gemm: bool) -> Iterator[JaxBench]:
    """pallas_gg on its Mosaic GPU lowering, default tiles, no tuner: forward (plain, and
    with the shape's fusion: permute_x for a first GEMM, permute_y for a second, both as a
    separate gather/scatter pass around the TMA-fed kernel), dX, dW and the differentiable
    op's backward."""
    import jax
    import pallas_gg

    topk, mosaic = j.topk, dict(backend="mosaic")
    yield "pallas_gg_mosaic", "fwd", jax.jit(lambda x, w, ms, g: pallas_gg.grouped_gemm_forward(
        x, w, ms, g, topk, **mosaic)), (j.x, j.w, j.m_sizes, j.gather)
    fused = dict(permute_x=True) if first_gemm else dict(permute_y=True)
    name = "pallas_gg_mosaic_permute_x" if first_gemm else "pallas_gg_mosaic_permute_y"
    yield name, "fwd", jax.jit(lambda x, w, ms, g: pallas_gg.grouped_gemm_forward(
        x, w, ms, g, topk, **fused, **mosaic)), (
        j.x_tokens if first_gemm else j.x, j.w, j.m_sizes, j.gather)
    yield "pallas_gg_mosaic", "dX", jax.jit(lambda dy, w, ms, g: pallas_gg.grouped_gemm_dX(
        dy, w, ms, g, topk, **mosaic)), (j.dy, j.w, j.m_sizes, j.gather)
    yield "pallas_gg_mosaic", "dW", jax.jit(lambda x, dy, ms, g: pallas_gg.grouped_gemm_dW(
        x, dy, ms, g, topk, **mosaic)), (j.x, j.dy, j.m_sizes, j.gather)
    yield "pallas_gg_mosaic", "bwd", *backward_only(lambda a, b: pallas_gg.grouped_gemm(
        a, b, j.m_sizes, j.gather, topk, **mosaic), (j.x, j.w), j.dy)


def jax_groups(inp: TorchInputs, first_gemm: bool,
               impls: set[str]) -> Iterator[tuple[str, Callable[[], list[JaxBench]]]]:
    """(implementation, a function building its benches) for each wanted JAX
    implementation, on inputs converted once: the caller builds each group on its own, so
    one that fails to set up (jax.lax.ragged_dot's backward runs its forward there, which
    at T = 32768 asks XLA for 128 GiB) costs only its own rows."""
    j = JaxInputs(inp)
    groups = [("dense_xla", lambda: dense(j)), ("lax_ragged_dot", lambda: lax_ragged_dot(j)),
              ("tokamax", lambda: tokamax(j)),
              ("pallas_gg", lambda: pallas_gg_impls(j, first_gemm)),
              ("pallas_gg_tuned", lambda: pallas_gg_tuned_impls(j)),
              ("pallas_gg_mosaic", lambda: pallas_gg_mosaic_impls(j, first_gemm))]
    for name, make in groups:
        if name in impls:
            yield name, lambda make=make: list(make())