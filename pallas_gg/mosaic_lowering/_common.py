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


def run_persistent(body, out_type, args, *, num_sms: int, interpret, num_threads=None):
    """body as a persistent kernel: one program per SM (grid axis "sm"), Warpgroup
    semantics, with `num_threads` warpgroups (axis "wg") where given; launched on args."""
    threads = {} if num_threads is None else {"num_threads": num_threads, "thread_name": "wg"}
    kernel = plgpu.kernel(
        body, out_type=out_type, grid=(num_sms,), grid_names=("sm",), **threads,
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return launch(kernel, args, interpret)


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


def grouped_visit(index, num_tiles: int, grid_n: int, group: int):
    """Visit number -> (schedule tile, N-block): `group` consecutive tiles walk each
    N-column together, so the weight blocks of an expert are read by its row blocks while
    they are in L2. Row-major order (group 1: a tile sweeps every N-block before the next
    tile starts) streamed an expert's whole weight once per row block: at llama4_w1 (168 MB
    per expert) that made the plain Triton forward memory-bound (518 against 583 TFLOP/s
    grouped; benchmarks/NOTES.md step 13). num_tiles, grid_n and group are static."""
    if group <= 1:
        return index // grid_n, index % grid_n
    per_group = group * grid_n
    first = (index // per_group) * group
    size = jnp.minimum(num_tiles - first, group)
    within = index % per_group
    return first + within % size, within // size
