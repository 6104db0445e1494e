"""Pallas' Triton lowering of the grouped GEMM kernels (forward, dX, dW)."""

from pallas_gg.triton_lowering.dw import dw
from pallas_gg.triton_lowering.dx import dx
from pallas_gg.triton_lowering.forward import forward

__all__ = ["dw", "dx", "forward"]
