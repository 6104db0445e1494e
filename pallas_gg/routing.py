"""``route``: the routing arrays of the contract, built on the device with jnp."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gg_spec import checks
from pallas_gg._backend import resolve_backend
from pallas_gg._validate import as_array, is_traced, read_scalars


@functools.partial(jax.jit, static_argnames=("num_experts",))
def _route(topk_ids, num_experts: int):
    flat = topk_ids.reshape(-1).astype(jnp.int32)
    # ids outside [0, E) (unchecked under jit) count for no expert and sort last
    flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    m_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    # gather_indices[p] is the routed row at expert-order position p: a stable argsort keeps
    # each expert's rows in routed-row (token) order.
    gather_indices = jnp.argsort(flat, stable=True).astype(jnp.int32)
    return m_sizes, gather_indices


def route(topk_ids, num_experts: int, *, backend="auto"):
    """(m_sizes int32 [E], gather_indices int32 [M]) for topk_ids [T, k] (M = T*k), on the
    device of topk_ids; jit-compatible (num_experts is static).

    Out-of-range expert ids are refused when topk_ids is concrete (and value checks are on);
    under jax.jit they are not checked: they count for no expert (sum(m_sizes) < M) and
    their rows sort after every expert's.
    """
    resolve_backend(backend, mosaic_ready=True)  # plain jnp: the same on every lowering
    topk_ids = as_array(topk_ids)
    checks.check_topk_ids(tuple(topk_ids.shape), jnp.dtype(topk_ids.dtype).name, num_experts)
    if checks.value_checks_enabled() and not is_traced(topk_ids) and topk_ids.size:
        with jax.ensure_compile_time_eval():
            lo, hi = read_scalars(jnp.min(topk_ids).astype(jnp.int32),
                                  jnp.max(topk_ids).astype(jnp.int32))
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids values must lie in [0, num_experts={num_experts}), "
                             f"got range [{lo}, {hi}] (topk_ids shape {topk_ids.shape})")
    return _route(topk_ids, num_experts)
