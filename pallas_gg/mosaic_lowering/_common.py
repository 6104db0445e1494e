"""Pieces every Mosaic GPU kernel of this package uses: the shared-memory layout wgmma reads,
and launching a kernel compiled or in Mosaic GPU's interpreter."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


def smem_transforms(minor: int, dtype):
    """Tiling + swizzle of a shared-memory tile whose minor dimension has `minor` elements
    (the swizzled layout wgmma reads, transposed or not)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def launch(kernel, args, interpret):
    """kernel(*args), compiled for the GPU (interpret=False) or run by Mosaic GPU's
    interpreter on any device (True, or a ``plgpu.InterpretGPUParams``: e.g. its race
    detector). ``plgpu.kernel(interpret=True)`` is not that interpreter, hence this."""
    if not interpret:
        return kernel(*args)
    params = (interpret if isinstance(interpret, plgpu.InterpretGPUParams)
              else plgpu.InterpretGPUParams())
    with plgpu.force_gpu_interpret_mode(params):
        return kernel(*args)
