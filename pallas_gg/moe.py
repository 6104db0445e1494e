"""The MoE expert block on pallas_gg's kernels, as a pure function of a params pytree.

    hidden [T, H] --gather (permute_x)--> gate_up_proj [E, 2I, H] --> act(gate) * up [M, I]
                  --> down_proj [E, H, I], scatter (permute_y), routing weight (fuse_mul_post)
                  --> sum over each token's k rows --> [T, H]

The same computation as ``triton_gg.moe_experts`` (Hugging Face weight layout), jit- and
grad-compatible: routing runs on the device, every step is differentiable.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from pallas_gg.autodiff import grouped_gemm
from pallas_gg.routing import route


def moe_experts(params: dict, hidden: jax.Array, top_k_index: jax.Array,
                top_k_weights: jax.Array, *, act: Callable = jax.nn.silu,
                autotune: bool = False, backend: str = "auto") -> jax.Array:
    """out [T, H] = sum_j top_k_weights[t, j] * down[e_j](act(gate[e_j] x_t) * up[e_j] x_t).

    params: {"gate_up_proj": [E, 2I, H] (gate rows first, then up), "down_proj": [E, H, I]};
    hidden [T, H]; top_k_index [T, k] int; top_k_weights [T, k].
    """
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if hidden.ndim != 2 or top_k_index.ndim != 2 or top_k_index.shape != top_k_weights.shape:
        raise ValueError(f"expected hidden [T, H], top_k_index and top_k_weights [T, k]; got "
                         f"{hidden.shape}, {top_k_index.shape}, {top_k_weights.shape}")
    if top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(f"top_k_index has {top_k_index.shape[0]} tokens, hidden "
                         f"{hidden.shape[0]}")
    if gate_up.ndim != 3 or down.ndim != 3 or 2 * down.shape[2] != gate_up.shape[1]:
        raise ValueError(f"expected gate_up_proj [E, 2I, H] and down_proj [E, H, I]; got "
                         f"{gate_up.shape} and {down.shape}")
    tokens, topk = top_k_index.shape
    m_sizes, gather = route(top_k_index, gate_up.shape[0], backend=backend)
    h = grouped_gemm(hidden, gate_up, m_sizes, gather, topk, permute_x=True,
                     autotune=autotune, backend=backend)                   # [M, 2I]
    gate, up = jnp.split(h, 2, axis=-1)
    a = act(gate) * up                                                     # [M, I]
    y = grouped_gemm(a, down, m_sizes, gather, topk, permute_y=True,
                     topk_weights=top_k_weights.reshape(-1).astype(hidden.dtype),
                     fuse_mul_post=True, autotune=autotune, backend=backend)  # [T*k, H]
    return y.reshape(tokens, topk, down.shape[1]).sum(axis=1)


def init_params(key: jax.Array, num_experts: int, hidden_size: int, intermediate_size: int,
                dtype=jnp.float32) -> dict:
    """Random params in the Hugging Face layout, scaled 1/sqrt(fan_in)."""
    k1, k2 = jax.random.split(key)
    return {
        "gate_up_proj": jax.random.normal(
            k1, (num_experts, 2 * intermediate_size, hidden_size), dtype) * hidden_size**-0.5,
        "down_proj": jax.random.normal(
            k2, (num_experts, hidden_size, intermediate_size), dtype) * intermediate_size**-0.5,
    }
