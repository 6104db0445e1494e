"""Host-side TMA descriptors (Hopper's bulk tensor copy engine) for the operands that are
read as whole tiles: W always, X / dY when not gathered.

A TMA tile may run past an expert's last row (into the next expert's rows) or past N; those
rows and columns only reach output elements that the masked store drops, or are multiplied
by masked-to-zero values, so the result is unchanged. Past the end of the tensor the engine
fills zeros. The engine needs 16-byte aligned rows: where a tensor does not have them the
launcher falls back to pointer loads (``tma_usable``), which is what a TMA switch means on a
shape it cannot serve.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _device_has_tma(kind: str, index: int | None) -> bool:
    if kind != "cuda":
        return True  # the interpreter emulates descriptor loads
    return torch.cuda.get_device_capability(index)[0] >= 9  # Hopper and newer


def tma_usable(t: torch.Tensor, inner_block: int) -> bool:
    """Can `t` (viewed 2-D, last dim contiguous) be read by TMA tiles `inner_block` wide, on
    its device? (Before Hopper there is no TMA engine: the switches then mean nothing.)"""
    if not _device_has_tma(t.device.type, t.device.index):
        return False
    if t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    elem = t.element_size()
    return all((s * elem) % 16 == 0 for s in t.stride()[:-1]) and inner_block * elem >= 16


def descriptor_2d(t2d: torch.Tensor, block_rows: int, block_cols: int):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor.from_tensor(t2d, [block_rows, block_cols])


def weights_2d(w: torch.Tensor) -> torch.Tensor | None:
    """W [E, N, K] as [E*N, K] without a copy, or None if its strides don't allow it."""
    e, n, k = w.shape
    if w.stride() != (n * k, k, 1):
        return None
    return w.view(e * n, k)
