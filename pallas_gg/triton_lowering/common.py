"""Helpers shared by the Triton-lowered kernels: masked 2-D loads/stores through row index
vectors, the program-id swizzle, compiler params and the pallas_call wrapper.

Interpreter notes (JAX 0.11.2, ``interpret=True``): a load or store that mixes a ``pl.ds``
slice with an index vector is not discharged, so every 2-D access uses two broadcast index
arrays (``rows[:, None]``, ``cols[None, :]``); masked-off lanes must carry ``other`` (the
interpreter otherwise returns whatever the clamped gather read); and a masked store rewrites
the old value at masked-off indices, so store indices must be unique within one store. Row
index vectors therefore give masked-off rows *distinct out-of-range* rows (``num_rows + i``):
the interpreter drops out-of-range scatter updates, and on a GPU masked lanes are not written.

On a GPU the Triton lowering widens pointer offsets to 64 bits by itself when an array spans
more than 2**32 bytes, so M*K, M*N or E*N*K past 2**31 elements is safe; the index vectors
themselves (rows < M, columns < N or K) stay int32.
"""

from __future__ import annotations


import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_gg._backend import quiet_triton_deprecation

# fp32 dots in IEEE precision (not tf32); bf16/fp16 dots accumulate in fp32 either way.
DOT_PRECISION = lax.Precision.HIGHEST


def compiler_params(config):
    """num_warps / num_stages of a gg_spec config. TMA switches (tma_*) cannot be honoured
    by Pallas' Triton lowering, which has no TMA descriptors: they are accepted (validated by
    gg_spec) and ignored here."""
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (optionally transposed operands) with an fp32 result; lowers to one tt.dot."""
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    return lax.dot_general(a, b, (contract, ((), ())), precision=DOT_PRECISION,
                           preferred_element_type=jnp.float32)


# Integer and select helpers for kernel code. jnp's `where`, `//` and `%` wrap their work in
# a nested jit; the Triton lowering of JAX 0.11.2 mistypes Python literals passed into such a
# nested jit (``jnp.where(pred, 32, 0)`` lowers to ``select(pred, false, false)``), so kernels
# use the lax primitives directly, on non-negative int32 values.

def div(a, b):
    """a // b for non-negative int32 a and b."""
    return lax.div(a, jnp.asarray(b, jnp.int32))


def rem(a, b):
    """a % b for non-negative int32 a and b."""
    return lax.rem(a, jnp.asarray(b, jnp.int32))


def cdiv(a, b):
    """ceil(a / b) for non-negative int32 a and positive b."""
    return div(a + (b - 1), b)


def select(pred, on_true, on_false):
    """Elementwise pred ? on_true : on_false with int32 scalars or vectors broadcast to the
    shape of pred."""
    shape = jnp.shape(pred)
    on_true = jnp.broadcast_to(jnp.asarray(on_true, jnp.int32), shape)
    on_false = jnp.broadcast_to(jnp.asarray(on_false, jnp.int32), shape)
    return lax.select(pred, on_true, on_false)


def block_range(block_index, block: int):
    """Indices [block_index*block, (block_index+1)*block) as an int32 vector."""
    return block_index * block + jnp.arange(block, dtype=jnp.int32)


def load_tile(ref, rows, cols, row_ok, col_ok, *, lead=None):
    """ref[rows, cols] (or ref[lead, rows, cols]) as a [len(rows), len(cols)] tile; masked-off
    entries read as 0."""
    index = (rows[:, None], cols[None, :])
    if lead is not None:
        index = (lead,) + index
    return plgpu.load(ref.at[index], mask=row_ok[:, None] & col_ok[None, :], other=0)


def store_tile(ref, rows, cols, row_ok, col_ok, value, *, lead=None):
    """ref[rows, cols] = value where row_ok & col_ok (rows must be unique, see module doc)."""
    index = (rows[:, None], cols[None, :])
    if lead is not None:
        index = (lead,) + index
    plgpu.store(ref.at[index], value.astype(ref.dtype),
                mask=row_ok[:, None] & col_ok[None, :])


def out_of_range_rows(num_rows: int, block: int):
    """Distinct rows past the end of an array of ``num_rows`` rows, for masked-off lanes."""
    return num_rows + jnp.arange(block, dtype=jnp.int32)


def load_routed_rows(gather_ref, positions, row_ok, num_rows: int):
    """(gather_indices[p] for the tile's expert-order positions, which rows to follow).

    Kernels are memory-safe for any routing values (value checks are off by default, and
    under jit they cannot run): a row whose index is outside [0, num_rows) is masked off,
    never followed (the GPU does not clamp indices; interpret mode would). Masked-off rows,
    and rows past the tile's end, get distinct out-of-range rows so that a scatter through
    them never repeats an index (see the module doc). Two compares and a select per row."""
    spare = out_of_range_rows(num_rows, positions.shape[0])
    routed = plgpu.load(gather_ref.at[positions], mask=row_ok, other=spare)
    ok = row_ok & (routed >= 0) & (routed < num_rows)
    return lax.select(ok, routed, spare), ok


def load_vector(ref, index, ok):
    """ref[index] as a vector; entries where ``ok`` is False read as 0."""
    return plgpu.load(ref.at[index], mask=ok, other=0)


def swizzle(pid, num_row_tiles: int, num_col_tiles: int, group_m: int):
    """(row tile, column tile) of program ``pid`` with ``group_m`` row tiles per group: the
    programs of a group walk the column tiles of ``group_m`` row tiles together (L2 reuse of
    the column operand); group_m = 1 is row-major (column tiles of one row tile adjacent)."""
    if group_m == 1:
        return div(pid, num_col_tiles), rem(pid, num_col_tiles)
    per_group = group_m * num_col_tiles
    first = div(pid, per_group) * group_m
    size = lax.min(num_row_tiles - first, jnp.int32(group_m))
    local = rem(pid, per_group)
    return first + rem(local, size), div(local, size)


def run_kernel(kernel, *, out_shape, grid, config, interpret: bool, name: str, args):
    """pallas_call over whole-array refs (the kernels index them themselves)."""
    call = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(config),
        name=name,
    )
    with quiet_triton_deprecation():
        return call(*args)


def dummy_index_array():
    """A placeholder int32 operand for kernels that do not gather (keeps one signature)."""
    return jnp.zeros((1,), jnp.int32)


__all__ = ["DOT_PRECISION", "block_range", "cdiv", "compiler_params", "div", "dot",
           "dummy_index_array", "load_routed_rows", "load_tile", "load_vector",
           "out_of_range_rows", "rem",
           "run_kernel", "select", "store_tile", "swizzle"]
