"""Argument descriptions for gg_spec's checks, and the eager value checks.

The shape, dtype and device checks live in ``gg_spec.checks`` (shared with triton_gg); this
module only describes JAX arrays as ``ArgInfo`` and reads the five numbers the value checks
need (sum and min of m_sizes; min, max and number of distinct values of gather_indices) in
one device-to-host transfer.
Value checks run only on concrete arrays (not under jax.jit / grad tracing) and only while
``gg_spec.value_checks_enabled()``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gg_spec import checks
from gg_spec.checks import ArgInfo, Dims

_TRACED = "traced"


def is_traced(*arrays) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in arrays if a is not None)


def _device_of(a) -> str:
    try:
        devices = a.devices()
    except Exception:  # noqa: BLE001
        return _TRACED
    return ",".join(sorted(str(d) for d in devices))


def arg_infos(**arrays) -> dict[str, ArgInfo | None]:
    """ArgInfo(shape, dtype name, device) per named array (None stays None).

    Under tracing the placement of a tracer is unknown; every argument then gets the same
    device label (JAX itself refuses arrays committed to different devices).
    """
    traced = is_traced(*arrays.values())
    out = {}
    for name, a in arrays.items():
        if a is None:
            out[name] = None
            continue
        device = _TRACED if traced else _device_of(a)
        out[name] = ArgInfo(tuple(a.shape), jnp.dtype(a.dtype).name, device)
    return out


def as_array(a):
    """numpy inputs become jax arrays; None and jax arrays pass through. The conversion is
    evaluated eagerly also while a jax.jit function is traced, so numpy routing arrays closed
    over by it stay concrete and get the value checks."""
    if a is None or isinstance(a, jax.Array):
        return a
    with jax.ensure_compile_time_eval():
        return jnp.asarray(a)


@functools.partial(jax.jit, static_argnames="routed_rows")
def _routing_stats(m_sizes, gather, routed_rows):
    m_sizes = m_sizes.astype(jnp.int64 if m_sizes.dtype == jnp.int64 else jnp.int32)
    stats = [jnp.sum(m_sizes), jnp.min(m_sizes)]
    if gather is not None and gather.size and routed_rows:
        seen = jnp.zeros(routed_rows, bool).at[jnp.clip(gather, 0, routed_rows - 1)].set(True)
        stats += [jnp.min(gather).astype(stats[0].dtype), jnp.max(gather).astype(stats[0].dtype),
                  jnp.sum(seen).astype(stats[0].dtype)]
    return jnp.stack(stats)


def routing_stats(m_sizes, gather, routed_rows: int):
    """(sum, min of m_sizes, then min, max and the number of distinct values of gather, or
    None) in one device-to-host read."""
    # Concrete routing arrays closed over by a jax.jit function are checked too: compute the
    # statistics eagerly rather than staging them into the caller's program.
    with jax.ensure_compile_time_eval():
        stats = np.asarray(_routing_stats(m_sizes, gather, routed_rows=routed_rows)).tolist()
    if len(stats) == 2:
        stats += [None, None, None]
    return stats


def read_scalars(*values) -> list:
    """Scalars computed from concrete arrays, read back in one transfer (eagerly, also while
    a jax.jit function is being traced)."""
    with jax.ensure_compile_time_eval():
        return np.asarray(jnp.stack([jnp.asarray(v) for v in values])).tolist()


def check_routing_values(dims: Dims, m_sizes, gather, *, fused: bool) -> None:
    """sum(m_sizes) == M, m_sizes >= 0 and, where a fusion reads them (``fused``), the gather
    indices a permutation of the routed rows; when values are known."""
    gather = gather if fused else None
    if not checks.value_checks_enabled() or is_traced(m_sizes, gather):
        return
    if m_sizes.shape[0] == 0:  # no experts: nothing to read, and M must be 0
        checks.check_values(dims, 0, 0, None, None)
        return
    checks.check_values(dims, *routing_stats(m_sizes, gather, dims.routed_rows))
