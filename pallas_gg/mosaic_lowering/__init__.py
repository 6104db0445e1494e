"""pallas_gg on Pallas' Mosaic GPU lowering (Hopper: TMA, wgmma, warp specialization).

What exists: ``grouped_matmul``, a persistent grouped GEMM over a tile schedule built on the
device once per routing (``schedule.tile_schedule``), which runs the forward
(Y = X @ W[e].T) and dX (dX = dY @ W[e]) and stores the zero rows past sum(m_sizes) itself;
its warp-specialized form (``matmul_ws.py``: a memory warpgroup feeding two compute
warpgroups, ``MosaicConfig(compute_wgs=2)``); ``grouped_dw``, dW ragged along the reduction
(``dw.py``); the contract's fusions as gather passes around them (``ops``), which
``pallas_gg.grouped_gemm(..., backend="mosaic")`` differentiates. Not yet: fused row
gathers, a warp-specialized dW, tuning, ragged_dot / tune on this lowering (they raise
NotImplementedError).
"""

from pallas_gg.mosaic_lowering.dw import grouped_dw
from pallas_gg.mosaic_lowering.matmul import MosaicConfig, grouped_matmul
from pallas_gg.mosaic_lowering.schedule import tile_schedule

__all__ = ["MosaicConfig", "grouped_dw", "grouped_matmul", "tile_schedule"]
