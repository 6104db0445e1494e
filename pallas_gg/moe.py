"""The MoE expert block on pallas_gg's kernels, as a pure function of a params pytree.

    hidden [T, H] --gather (permute_x)--> gate_up_proj [E, 2I, H] (+ bias) --> act(gate) * up
                  [M, I] --> down_proj [E, H, I], scatter (permute_y), routing weight
                  (fuse_mul_post) --> sum over each token's k rows (+ weighted bias) --> [T, H]

The same computation as ``triton_gg.moe_experts`` (Hugging Face weight layout, the same
optional biases, the same rule for foreign expert ids), jit- and grad-compatible: routing runs
on the device; outside jit the routing built here is trusted (no host reads of its values).
Slots whose expert id lies outside [0, E) contribute nothing; they are dropped before the
kernels (routed past sum(m_sizes)), so an expert-parallel rank computes only its own rows.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from gg_spec import checks
from gg_spec.checks import routing_trusted
from pallas_gg.autodiff import grouped_gemm
from pallas_gg.routing import route


def _fail(msg: str):
    raise ValueError(msg)


def _check_block(params, hidden, top_k_index, top_k_weights):
    missing = [name for name in ("gate_up_proj", "down_proj") if name not in params]
    if missing:
        _fail(f"params lacks {missing} (it holds {sorted(params)})")
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    for name, a in (("hidden", hidden), ("top_k_weights", top_k_weights),
                    ("gate_up_proj", gate_up), ("down_proj", down)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            _fail(f"{name} must be a floating-point array, got {a.dtype} (shape {a.shape})")
    if hidden.ndim != 2 or top_k_index.ndim != 2 or top_k_index.shape != top_k_weights.shape:
        _fail(f"expected hidden [T, H], top_k_index and top_k_weights [T, k]; got "
              f"{hidden.shape}, {top_k_index.shape}, {top_k_weights.shape}")
    if top_k_index.shape[0] != hidden.shape[0]:
        _fail(f"top_k_index {top_k_index.shape} has {top_k_index.shape[0]} tokens, hidden "
              f"{hidden.shape} has {hidden.shape[0]}")
    if not jnp.issubdtype(top_k_index.dtype, jnp.integer):
        _fail(f"top_k_index must be an integer array, got {top_k_index.dtype}")
    if (gate_up.ndim != 3 or down.ndim != 3 or 2 * down.shape[2] != gate_up.shape[1]
            or gate_up.shape[0] != down.shape[0]):
        _fail(f"expected gate_up_proj [E, 2I, H] and down_proj [E, H, I]; got "
              f"{gate_up.shape} and {down.shape}")
    if gate_up.shape[2] != hidden.shape[1] or down.shape[1] != hidden.shape[1]:
        _fail(f"gate_up_proj {gate_up.shape} and down_proj {down.shape} must both take "
              f"H={hidden.shape[1]} of hidden {hidden.shape}")
    for name, weight in (("gate_up_proj_bias", gate_up), ("down_proj_bias", down)):
        bias = params.get(name)
        if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
            _fail(f"{name} must be [E, N] = {tuple(weight.shape[:2])}, got {bias.shape}")


def moe_experts(params: dict, hidden: jax.Array, top_k_index: jax.Array,
                top_k_weights: jax.Array, *, act: Callable = jax.nn.silu,
                autotune: bool = False, backend: str = "auto") -> jax.Array:
    """out [T, H] = sum_j top_k_weights[t, j] * down[e_j](act(gate[e_j] x_t) * up[e_j] x_t).

    params: {"gate_up_proj": [E, 2I, H] (gate rows first, then up), "down_proj": [E, H, I],
    optional "gate_up_proj_bias": [E, 2I], "down_proj_bias": [E, H]}; hidden [T, H];
    top_k_index [T, k] int; top_k_weights [T, k]. The result has hidden's dtype; the GEMMs
    run in the weights' dtype with fp32 accumulation.
    """
    _check_block(params, hidden, top_k_index, top_k_weights)
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    b1, b2 = params.get("gate_up_proj_bias"), params.get("down_proj_bias")
    tokens, topk = top_k_index.shape
    num_experts = gate_up.shape[0]
    # foreign ids (expert-parallel sentinels): weight 0 and id E, so routing leaves them out
    # of m_sizes and sorts them last; no kernel computes their rows (the kernels write
    # zeros past sum(m_sizes), and the scattered outputs of those rows stay zero)
    valid = (top_k_index >= 0) & (top_k_index < num_experts)
    index = jnp.where(valid, top_k_index, num_experts).astype(jnp.int32)
    weights = jnp.where(valid, top_k_weights, 0).astype(gate_up.dtype)
    with routing_trusted():
        m_sizes, gather = route(index, num_experts, backend=backend)
        h = grouped_gemm(hidden.astype(gate_up.dtype), gate_up, m_sizes, gather, topk,
                         permute_x=True, autotune=autotune, backend=backend)   # [M, 2I]
        if b1 is not None:  # expert of each expert-order position: the sorted ids
            experts = jnp.minimum(index.reshape(-1)[gather], num_experts - 1)
            h = h + b1.astype(h.dtype)[experts]   # dropped rows: not read by the 2nd GEMM
        gate, up = jnp.split(h, 2, axis=-1)
        a = (act(gate) * up).astype(down.dtype)                                # [M, I]
        y = grouped_gemm(a, down, m_sizes, gather, topk, permute_y=True,
                         topk_weights=weights.reshape(-1), fuse_mul_post=True,
                         autotune=autotune, backend=backend)                  # [T*k, H]
    out = y.reshape(tokens, topk, down.shape[1]).sum(axis=1)
    if b2 is not None:  # sum_j w_j * b2[e_j]: the bias rides the routing weight too
        b2_rows = b2.astype(weights.dtype)[jnp.minimum(index, num_experts - 1)]  # weight 0
        out = out + jnp.einsum("tk,tkh->th", weights, b2_rows)
    return out.astype(hidden.dtype)


def init_params(key: jax.Array, num_experts: int, hidden_size: int, intermediate_size: int,
                dtype=jnp.float32) -> dict:
    """Random params in the Hugging Face layout, scaled 1/sqrt(fan_in)."""
    checks.check_layer_sizes(num_experts=num_experts, hidden_size=hidden_size,
                             intermediate_size=intermediate_size)
    k1, k2 = jax.random.split(key)
    return {
        "gate_up_proj": jax.random.normal(
            k1, (num_experts, 2 * intermediate_size, hidden_size), dtype) * hidden_size**-0.5,
        "down_proj": jax.random.normal(
            k2, (num_experts, hidden_size, intermediate_size), dtype) * intermediate_size**-0.5,
    }
