"""triton_gg: MoE grouped GEMM in Triton for PyTorch.

Forward, dX and dW kernels with the MoE fusions (gather on load ``permute_x``, scatter on
store ``permute_y``, routing-weight multiply ``fuse_mul_post``), a differentiable op that
compiles under ``torch.compile``, routing on the device, and a ``torch._grouped_mm`` drop-in.
On a machine without a GPU, CPU tensors run through the Triton interpreter.
"""

from triton_gg import _runtime  # noqa: F401  (must run before triton is imported)
from gg_spec import DWConfig, DXConfig, ForwardConfig, set_value_checks, value_checks
from triton_gg.api import (grouped_gemm, grouped_gemm_dW, grouped_gemm_dX,
                           grouped_gemm_forward)
from triton_gg.grouped_mm import grouped_mm
from triton_gg.hf import register_hf_experts
from triton_gg.moe import MoEExperts, moe_experts
from triton_gg.routing import route

__all__ = ["DWConfig", "DXConfig", "ForwardConfig", "MoEExperts", "grouped_gemm",
           "grouped_gemm_dW", "grouped_gemm_dX", "grouped_gemm_forward", "grouped_mm",
           "moe_experts", "register_hf_experts", "route", "set_value_checks", "value_checks"]
