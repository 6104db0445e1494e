"""Argument checks before any launch: torch tensors described for gg_spec.checks, plus the
value checks (one small device-to-host read), skipped under torch.compile tracing."""

from __future__ import annotations

import torch

import gg_spec
from gg_spec import checks
from gg_spec.checks import ArgInfo
from triton_gg._runtime import check_device  # noqa: F401  (re-exported)


def describe(t: torch.Tensor | None) -> ArgInfo | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(t).__name__}")
    return ArgInfo(tuple(t.shape), str(t.dtype).replace("torch.", ""), str(t.device))


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_values(dims, m_sizes: torch.Tensor, gather: torch.Tensor | None) -> None:
    """sum(m_sizes) == M and gather indices in range, read off the device at once."""
    if _tracing() or not gg_spec.value_checks_enabled() or m_sizes.numel() == 0:
        return
    stats = [m_sizes.sum(), m_sizes.min()]
    has_gather = gather is not None and gather.numel() > 0
    if has_gather:
        stats += [gather.min().to(m_sizes.dtype), gather.max().to(m_sizes.dtype)]
    values = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    gmin, gmax = (values[2], values[3]) if has_gather else (None, None)
    checks.check_values(dims, values[0], values[1], gmin, gmax)


def check_config(op, config, *, permute_x, permute_y, fuse_mul_post=False):
    gg_spec.validate(op, config, permute_x=permute_x, permute_y=permute_y,
                     fuse_mul_post=fuse_mul_post)


def _finish(op, dims, first, first_name, m_sizes, gather, config, *, permute_x, permute_y,
            fuse_mul_post=False):
    """What every op checks after its shapes: the device, the config, the routing values
    (the gather indices only where a fusion reads them)."""
    check_device(first, first_name)
    if config is not None:
        check_config(op, config, permute_x=permute_x, permute_y=permute_y,
                     fuse_mul_post=fuse_mul_post)
    uses_gather = permute_x or permute_y or fuse_mul_post
    check_values(dims, m_sizes, gather if uses_gather else None)
    return dims


def check_forward(x, w, m_sizes, gather, topk, *, permute_x, permute_y, topk_weights,
                  fuse_mul_post, config):
    dims = checks.check_forward(describe(x), describe(w), describe(m_sizes), describe(gather),
                                topk, permute_x=permute_x, permute_y=permute_y,
                                topk_weights=describe(topk_weights),
                                fuse_mul_post=fuse_mul_post)
    return _finish("forward", dims, x, "X", m_sizes, gather, config, permute_x=permute_x,
                   permute_y=permute_y, fuse_mul_post=fuse_mul_post)


def check_dX(dy, w, m_sizes, gather, topk, *, permute_x, permute_y, config):
    dims = checks.check_dX(describe(dy), describe(w), describe(m_sizes), describe(gather),
                           topk, permute_x=permute_x, permute_y=permute_y)
    return _finish("dX", dims, dy, "dY", m_sizes, gather, config, permute_x=permute_x,
                   permute_y=permute_y)


def check_dW(x, dy, m_sizes, gather, topk, *, permute_x, permute_y, config):
    dims = checks.check_dW(describe(x), describe(dy), describe(m_sizes), describe(gather),
                           topk, permute_x=permute_x, permute_y=permute_y)
    return _finish("dW", dims, x, "X", m_sizes, gather, config, permute_x=permute_x,
                   permute_y=permute_y)
