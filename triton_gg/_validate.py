"""Argument checks before any launch: torch tensors described for gg_spec.checks, plus the
value checks (one small device-to-host read), skipped under torch.compile tracing."""

from __future__ import annotations

import torch

import gg_spec
from gg_spec import checks
from gg_spec.checks import ArgInfo
from triton_gg._runtime import check_device  # noqa: F401  (re-exported)


def describe(t: torch.Tensor | None, name: str = "argument") -> ArgInfo | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return ArgInfo(tuple(t.shape), str(t.dtype).replace("torch.", ""), str(t.device))


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_values(dims, m_sizes: torch.Tensor, gather: torch.Tensor | None) -> None:
    """sum(m_sizes) == M, m_sizes >= 0, and the gather indices a permutation of the routed
    rows, read off the device at once (as int64: an int64 index past 2**31 must not wrap)."""
    if _tracing() or not gg_spec.value_checks_enabled():
        return
    if m_sizes.numel() == 0:  # no experts: nothing to read, and M must be 0
        checks.check_values(dims, 0, 0, None, None)
        return
    stats = [m_sizes.sum(), m_sizes.min()]
    has_gather = gather is not None and gather.numel() > 0 and dims.routed_rows > 0
    if has_gather:
        g = gather.to(torch.int64)
        # which rows some index names (a scatter, no host sync: bincount would read min and
        # max back to size its output)
        seen = torch.zeros(dims.routed_rows, dtype=torch.bool, device=g.device)
        seen[g.clamp(0, dims.routed_rows - 1)] = True
        stats += [g.min(), g.max(), seen.sum()]
    values = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    checks.check_values(dims, *values[:2], *(values[2:] if has_gather else (None, None)))


def check_config(op, config, *, permute_x, permute_y, fuse_mul_post=False, dtype=None):
    """gg_spec.validate; with ``dtype`` (the operands' torch dtype) a config that cannot fit
    Hopper's shared memory for it is refused too (before any compile or launch; also on
    CPU, where the interpreter would run it: the same call must not fail on the GPU)."""
    gg_spec.validate(op, config, permute_x=permute_x, permute_y=permute_y,
                     fuse_mul_post=fuse_mul_post,
                     dtype=None if dtype is None else gg_spec.configs.dtype_name(dtype))


def _finish(op, dims, first, first_name, m_sizes, gather, config, *, permute_x, permute_y,
            fuse_mul_post=False):
    """What every op checks after its shapes: the device, the config, the routing values
    (the gather indices only where a fusion reads them)."""
    check_device(first, first_name)
    if config is not None:
        check_config(op, config, permute_x=permute_x, permute_y=permute_y,
                     fuse_mul_post=fuse_mul_post, dtype=first.dtype)
    uses_gather = permute_x or permute_y or fuse_mul_post
    check_values(dims, m_sizes, gather if uses_gather else None)
    return dims


def check_forward(x, w, m_sizes, gather, topk, *, permute_x, permute_y, topk_weights,
                  fuse_mul_post, config):
    dims = checks.check_forward(describe(x, "X"), describe(w, "W"),
                                describe(m_sizes, "m_sizes"), describe(gather, "gather_indices"),
                                topk, permute_x=permute_x, permute_y=permute_y,
                                topk_weights=describe(topk_weights, "topk_weights"),
                                fuse_mul_post=fuse_mul_post)
    return _finish("forward", dims, x, "X", m_sizes, gather, config, permute_x=permute_x,
                   permute_y=permute_y, fuse_mul_post=fuse_mul_post)


def check_dX(dy, w, m_sizes, gather, topk, *, permute_x, permute_y, config):
    dims = checks.check_dX(describe(dy, "dY"), describe(w, "W"), describe(m_sizes, "m_sizes"),
                           describe(gather, "gather_indices"), topk, permute_x=permute_x,
                           permute_y=permute_y)
    return _finish("dX", dims, dy, "dY", m_sizes, gather, config, permute_x=permute_x,
                   permute_y=permute_y)


def check_dW(x, dy, m_sizes, gather, topk, *, permute_x, permute_y, config):
    dims = checks.check_dW(describe(x, "X"), describe(dy, "dY"), describe(m_sizes, "m_sizes"),
                           describe(gather, "gather_indices"), topk, permute_x=permute_x,
                           permute_y=permute_y)
    return _finish("dW", dims, x, "X", m_sizes, gather, config, permute_x=permute_x,
                   permute_y=permute_y)
