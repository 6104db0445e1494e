"""Pieces every Mosaic GPU kernel of this package uses: the shared-memory layout wgmma reads,
and launching a kernel compiled or in Mosaic GPU's interpreter."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu


# Mosaic GPU tiles the rows of a GMEM array that a TMA copy reads or writes in groups of 8
# (``TileTransform((8, swizzle))`` over the whole array): an array of more than 8 rows must
# hold a multiple of 8 ("When no rounding mode is specified, dimension 0 must have size
# smaller or a multiple of its tiling 8", seen on an H200 with M = 1026). The kernels' row
# operands are padded to this multiple (``pad_rows``) and their outputs sliced back.
ROW_TILING = 8


def padded_rows(m: int) -> int:
    """The row count a kernel runs for m rows: m itself when it is at most 8 or a multiple
    of 8 (no copy), else m rounded up to a multiple of 8."""
    return m if m <= ROW_TILING or m % ROW_TILING == 0 else -(-m // ROW_TILING) * ROW_TILING


def pad_rows(a, rows: int):
    """a [m, ...] with zero rows appended up to `rows` (a itself when it has them)."""
    extra = rows - a.shape[0]
    return a if extra == 0 else jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1))


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
