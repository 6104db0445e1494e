"""Host-side TMA descriptors (Hopper's bulk tensor copy engine) for the operands that are
read as whole tiles: W always, X / dY of the forward and dX when not gathered; and for dW's
output tiles, stored through a 3-D [E, N, K] view (the engine clips a tile at N and K
inside its expert). dW's X / dY tiles come through descriptors the kernel builds over each
expert's rows (``ensure_device_descriptor_scratch`` provides their memory).

A forward or dX TMA tile may run past an expert's last row (into the next expert's rows) or
past N; those rows and columns only reach output elements that the masked store drops, or
are multiplied by masked-to-zero values, so the result is unchanged. (dW sums over rows, so
its per-expert descriptors end at the expert's last row instead.) Past the end of a tensor
the engine fills zeros. The engine needs 16-byte aligned rows: where a tensor does not have
them the launcher falls back to pointer loads (``tma_usable``), which is what a TMA switch
means on a shape it cannot serve.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

_thread = threading.local()


@functools.lru_cache(maxsize=1)
def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def ensure_cuda_context(device: torch.device) -> None:
    """Make the device's primary context current on this thread.

    Building a TMA descriptor is a driver call that needs a current context, and torch's
    autograd engine runs backward on a thread of its own that may have none yet (a plain
    Triton launch sets one up itself, descriptor creation does not). Checked once per thread
    and device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if getattr(_thread, "device_with_context", None) == index:
        return
    lib = _libcuda()
    ctx = ctypes.c_void_p()
    if lib.cuCtxGetCurrent(ctypes.byref(ctx)) != 0:
        raise RuntimeError("cuCtxGetCurrent failed")
    if not ctx.value:
        dev = ctypes.c_int()
        if (lib.cuDeviceGet(ctypes.byref(dev), index) != 0
                or lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0
                or lib.cuCtxSetCurrent(ctx) != 0):
            raise RuntimeError(f"could not make the primary context of cuda:{index} current")
    _thread.device_with_context = index


@functools.lru_cache(maxsize=None)
def _device_has_tma(kind: str, index: int | None) -> bool:
    if kind != "cuda":
        return True  # the interpreter emulates descriptor loads
    return torch.cuda.get_device_capability(index)[0] >= 9  # Hopper and newer


def tma_usable(t: torch.Tensor, inner_block: int) -> bool:
    """Can `t` (last dim contiguous, any rank) be read or written by TMA tiles
    `inner_block` wide, on its device? (Before Hopper there is no TMA engine: the switches
    then mean nothing.)"""
    if not _device_has_tma(t.device.type, t.device.index):
        return False
    if t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    elem = t.element_size()
    return all((s * elem) % 16 == 0 for s in t.stride()[:-1]) and inner_block * elem >= 16


def descriptor(t: torch.Tensor, block: tuple[int, ...]):
    """A host-side TMA descriptor over `t` (any rank, last dim contiguous) moving `block`
    tiles."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    if t.is_cuda:
        ensure_cuda_context(t.device)
    return TensorDescriptor.from_tensor(t, list(block))


def ensure_device_descriptor_scratch() -> None:
    """Descriptors built inside a kernel (``tl.make_tensor_descriptor``: dW's per-expert
    operand descriptors) live in global scratch memory that Triton asks an allocator for at
    launch. Where the caller's context has none set, set one that takes the scratch from
    torch's caching allocator on the current stream's device; a caller's own allocator is
    left alone. (Triton keeps the allocator in a context variable, so autograd's backward
    thread needs its own.)"""
    import triton
    from triton.runtime import _allocation
    if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        return
    triton.set_allocator(_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def descriptor_2d(t2d: torch.Tensor, block_rows: int, block_cols: int):
    return descriptor(t2d, (block_rows, block_cols))


def weights_2d(w: torch.Tensor) -> torch.Tensor | None:
    """W [E, N, K] as [E*N, K] without a copy, or None if its strides don't allow it."""
    e, n, k = w.shape
    if w.stride() != (n * k, k, 1):
        return None
    return w.view(e * n, k)
