"""An example Flax NNX module over ``pallas_gg.moe_experts`` (needs ``flax``).

    layer = MoEExperts(num_experts=128, hidden_size=2048, intermediate_size=768,
                       rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    out = layer(hidden, top_k_index, top_k_weights)          # [T, H]

The module only holds the parameters (``nnx.Param``, Hugging Face layout, so checkpoints map
one to one); the computation is the pure function, so ``nnx.jit`` / ``nnx.grad`` and
``nnx.split`` / ``nnx.merge`` work as for any NNX module.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_gg._backend import resolve_backend
from pallas_gg.moe import init_params, moe_experts


class MoEExperts(nnx.Module):
    """Experts of an MoE MLP: gate_up_proj [E, 2I, H], down_proj [E, H, I] (optional biases
    [E, 2I] and [E, H]). __call__(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
    -> [T, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *,
                 rngs: nnx.Rngs, bias: bool = False, act: Callable = jax.nn.silu,
                 dtype=jnp.float32, autotune: bool = False, backend: str = "auto"):
        resolve_backend(backend, mosaic_ready=True)  # refuse an unknown name now, not at call
        params = init_params(rngs.params(), num_experts, hidden_size, intermediate_size,
                             dtype)
        self.gate_up_proj = nnx.Param(params["gate_up_proj"])
        self.down_proj = nnx.Param(params["down_proj"])
        if bias:
            self.gate_up_proj_bias = nnx.Param(
                jnp.zeros((num_experts, 2 * intermediate_size), dtype))
            self.down_proj_bias = nnx.Param(jnp.zeros((num_experts, hidden_size), dtype))
        self.has_bias = bias
        self.act, self.autotune, self.backend = act, autotune, backend

    def params(self) -> dict:
        """The parameters as the pytree ``pallas_gg.moe_experts`` takes."""
        names = ["gate_up_proj", "down_proj"]
        if self.has_bias:
            names += ["gate_up_proj_bias", "down_proj_bias"]
        return {n: getattr(self, n)[...] for n in names}

    def __call__(self, hidden: jax.Array, top_k_index: jax.Array,
                 top_k_weights: jax.Array) -> jax.Array:
        return moe_experts(self.params(), hidden, top_k_index, top_k_weights, act=self.act,
                           autotune=self.autotune, backend=self.backend)
