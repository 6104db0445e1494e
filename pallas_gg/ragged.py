"""``ragged_dot``: a drop-in for ``jax.lax.ragged_dot`` on the grouped GEMM kernels.

``jax.lax.ragged_dot(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]`` multiplies the
rows of group g by rhs[g]; rows past sum(group_sizes) come out zero. rhs is laid out [G, K, N]
while the grouped GEMMs take W [E, N, K]; no transpose is materialised, because each of the
three products is one of our kernels with rhs read in place as a W of other names:

* out    = lhs @ rhs[g]       : the dX kernel, dY = lhs [M, K], W = rhs as [E, N_w=K, K_w=N];
* d_lhs  = d_out @ rhs[g]^T   : the forward kernel, X = d_out [M, N], W = rhs as [E, K, N];
* d_rhs  = lhs_g^T @ d_out_g  : the dW kernel, X = d_out, dY = lhs -> [G, K, N].

Switch JAX MoE code with one line: ``from pallas_gg import ragged_dot``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gg_spec import DWConfig, DXConfig, ForwardConfig, checks
from pallas_gg._backend import resolve_backend, triton_lowering_module, use_interpreter
from pallas_gg._validate import arg_infos, as_array, is_traced, read_scalars
from pallas_gg.ops import resolve_config


@dataclasses.dataclass(frozen=True)
class _Static:
    out_dtype: object
    config: DXConfig
    grad_lhs_config: ForwardConfig
    grad_rhs_config: DWConfig
    interpret: bool


def _product(s: _Static, lhs, rhs, group_sizes):
    return triton_lowering_module().dx(lhs, rhs, group_sizes, None, num_rows=lhs.shape[0],
                              permute_x=False, permute_y=False, config=s.config,
                              interpret=s.interpret, out_dtype=s.out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ragged_dot(s: _Static, lhs, rhs, group_sizes):
    return _product(s, lhs, rhs, group_sizes)


def _ragged_dot_fwd(s, lhs, rhs, group_sizes):
    return _product(s, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _ragged_dot_bwd(s, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_out = d_out.astype(lhs.dtype)
    d_lhs = triton_lowering_module().forward(
        d_out, rhs, group_sizes, None, None, topk=1, num_rows=lhs.shape[0], permute_x=False,
        permute_y=False, fuse_mul_post=False, config=s.grad_lhs_config, interpret=s.interpret)
    d_rhs = triton_lowering_module().dw(d_out, lhs, group_sizes, None, topk=1, permute_x=False,
                               permute_y=False, config=s.grad_rhs_config,
                               interpret=s.interpret, out_dtype=rhs.dtype)
    return d_lhs, d_rhs, None


_ragged_dot.defvjp(_ragged_dot_fwd, _ragged_dot_bwd)


def _check(lhs, rhs, group_sizes):
    info = arg_infos(lhs=lhs, rhs=rhs, group_sizes=group_sizes)
    if info["lhs"].ndim != 2:
        raise ValueError(f"lhs must be 2-D [M, K], got shape {lhs.shape}")
    if info["rhs"].ndim != 3:
        raise ValueError(f"rhs must be 3-D [G, K, N], got shape {rhs.shape}")
    if info["group_sizes"].ndim != 1 or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(f"group_sizes must be [G] with G={rhs.shape[0]} (rhs {rhs.shape}), "
                         f"got shape {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs has K={lhs.shape[1]} (shape {lhs.shape}) but rhs {rhs.shape} "
                         f"expects K={rhs.shape[1]}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer array, got {group_sizes.dtype}")
    for name in ("lhs", "rhs"):
        if info[name].dtype not in checks.FLOAT_DTYPES:
            raise ValueError(f"{name} must have a dtype in {checks.FLOAT_DTYPES}, got "
                             f"{info[name].dtype}")
    if len({info["lhs"].device, info["rhs"].device, info["group_sizes"].device}) > 1:
        raise ValueError("lhs, rhs and group_sizes must be on one device")


def ragged_dot(lhs, rhs, group_sizes, precision=None, preferred_element_type=None,
               group_offset=None, *, config: DXConfig | None = None,
               grad_lhs_config: ForwardConfig | None = None,
               grad_rhs_config: DWConfig | None = None, backend="auto"):
    """lhs [M, K] @ rhs [G, K, N] group by group -> [M, N], like ``jax.lax.ragged_dot``.

    Differentiable (lhs and rhs) and jit-compatible. Rows past sum(group_sizes) are zero.
    ``precision`` is accepted for compatibility: products always accumulate in fp32 and fp32
    inputs multiply in IEEE precision. ``preferred_element_type`` sets the output dtype
    (default: the promoted input dtype). ``group_offset`` is not supported. ``config`` tiles
    the product (a DXConfig: its block_n is the reduction block over K), ``grad_lhs_config``
    and ``grad_rhs_config`` the two gradient GEMMs.
    """
    del precision  # fp32 accumulation and IEEE fp32 dots always
    resolve_backend(backend)
    if group_offset is not None:
        raise NotImplementedError("pallas_gg.ragged_dot does not support group_offset")
    lhs, rhs, group_sizes = map(as_array, (lhs, rhs, group_sizes))
    _check(lhs, rhs, group_sizes)
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    out_dtype = jnp.dtype(dtype if preferred_element_type is None else preferred_element_type)
    if (checks.value_checks_enabled() and not is_traced(group_sizes)
            and group_sizes.shape[0]):
        with jax.ensure_compile_time_eval():
            total, smallest = read_scalars(jnp.sum(group_sizes), jnp.min(group_sizes))
        if smallest < 0 or total > lhs.shape[0]:
            raise ValueError(f"group_sizes must be non-negative with sum <= M={lhs.shape[0]}, "
                             f"got sum {total} and minimum {smallest}")
    static = _Static(out_dtype, resolve_config("dX", config, dtype=dtype),
                     resolve_config("forward", grad_lhs_config, dtype=dtype),
                     resolve_config("dW", grad_rhs_config, dtype=dtype),
                     use_interpreter(lhs, rhs))
    return _ragged_dot(static, lhs, rhs, group_sizes.astype(jnp.int32))
