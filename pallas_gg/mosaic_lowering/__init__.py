"""pallas_gg on Pallas' Mosaic GPU lowering (Hopper: TMA, wgmma), work in progress.

What exists: ``grouped_matmul``, a persistent grouped GEMM over a tile schedule built on the
device once per routing (``schedule.tile_schedule``), which runs the plain forward
(Y = X @ W[e].T) and the plain dX (dX = dY @ W[e]). The fusions, dW and the benchmark
against the Triton lowering are not written yet; ``backend="mosaic"`` routes only what
exists and raises NotImplementedError for the rest.
"""

from pallas_gg.mosaic_lowering.matmul import MosaicConfig, grouped_matmul
from pallas_gg.mosaic_lowering.schedule import tile_schedule

__all__ = ["MosaicConfig", "grouped_matmul", "tile_schedule"]
