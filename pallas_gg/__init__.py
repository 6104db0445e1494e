"""pallas_gg: MoE grouped GEMMs (forward, dX, dW; fused gather, scatter and routing weights)
as Pallas GPU kernels for JAX, over the contract of DESIGN.md shared with ``triton_gg``.

Public API:

* ``grouped_gemm_forward``, ``grouped_gemm_dX``, ``grouped_gemm_dW``: the direct kernels;
* ``grouped_gemm``: the differentiable op (``jax.custom_vjp``), jit- and grad-compatible;
* ``route``: (m_sizes, gather_indices) from topk_ids, on the device;
* ``ragged_dot``: a drop-in for ``jax.lax.ragged_dot``;
* ``moe_experts``: the expert block (HF layout) as a pure function of a params pytree;
* ``tune``: autotune and cache the configs of one problem;
* ``ForwardConfig``, ``DXConfig``, ``DWConfig``: the kernel configs (from ``gg_spec``);
* ``set_value_checks`` / ``value_checks``: opt-in routing value checks (a host sync per
  eager call; off by default, as in ``triton_gg``).

Every function takes ``backend="auto" | "mosaic" | "triton"``. ``"auto"`` picks, per GEMM, the
Mosaic GPU lowering where it measured faster on Hopper (none so far:
``pallas_gg._backend.MOSAIC_FASTER_OPS``) and Pallas' Triton lowering elsewhere; the Mosaic
GPU lowering (``pallas_gg.mosaic_lowering``, Hopper: TMA + wgmma over a device-built tile
schedule, warp-specialized where the tile allows) runs forward, dX, dW, the differentiable
op, routing and the expert block in bf16/fp16, and raises NotImplementedError for
``ragged_dot`` and ``tune``. Without a GPU the kernels run in Pallas interpret mode (Mosaic
GPU's interpreter for the Mosaic kernels).
"""

from gg_spec import DWConfig, DXConfig, ForwardConfig, set_value_checks, value_checks
from pallas_gg.autodiff import grouped_gemm
from pallas_gg.moe import moe_experts
from pallas_gg.ops import grouped_gemm_dW, grouped_gemm_dX, grouped_gemm_forward
from pallas_gg.ragged import ragged_dot
from pallas_gg.routing import route
from pallas_gg.tuning import tune

__all__ = ["DWConfig", "DXConfig", "ForwardConfig", "grouped_gemm", "grouped_gemm_dW",
           "grouped_gemm_dX", "grouped_gemm_forward", "moe_experts", "ragged_dot", "route",
           "set_value_checks", "tune", "value_checks"]
