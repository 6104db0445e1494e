"""A drop-in for ``torch._grouped_mm`` on the 2-D x 3-D case, differentiable."""

from __future__ import annotations

import torch

from gg_spec import DWConfig, DXConfig, ForwardConfig
from gg_spec.checks import ArgInfo, Dims
from triton_gg import _ops, _validate, autotune


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *,
               forward_config: ForwardConfig | None = None, dx_config: DXConfig | None = None,
               dw_config: DWConfig | None = None) -> torch.Tensor:
    """out [M, N]: rows offs[e-1]:offs[e] of a [M, K] times b[e] [K, N].

    ``offs`` [E] int32 holds cumulative row ends (as for ``torch._grouped_mm``); its last
    entry must equal M. ``b`` may be any strided [E, K, N] tensor, e.g. the transpose of
    [E, N, K] weights, and is never copied.
    """
    for name, t in (("a", a), ("b", b), ("offs", offs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grouped_mm: {name} must be a torch.Tensor, got {type(t).__name__}")
    # checked here under the caller's names (the shared checks below say X, W, m_sizes)
    if offs.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped_mm: offs must be int32 or int64 (cumulative row ends), got "
                         f"{offs.dtype}")
    if a.dtype != b.dtype:
        raise ValueError(f"grouped_mm: a has dtype {a.dtype} but b has {b.dtype}; cast them to "
                         f"one dtype")
    if len({a.device, b.device, offs.device}) > 1:
        raise ValueError(f"grouped_mm: a, b and offs must be on one device, got {a.device}, "
                         f"{b.device} and {offs.device}")
    if a.ndim != 2 or b.ndim != 3 or offs.ndim != 1:
        raise ValueError(f"grouped_mm takes a [M, K], b [E, K, N], offs [E]; got a "
                         f"{tuple(a.shape)}, b {tuple(b.shape)}, offs {tuple(offs.shape)}")
    if offs.shape[0] != b.shape[0]:
        raise ValueError(f"offs has {offs.shape[0]} entries but b {tuple(b.shape)} has "
                         f"{b.shape[0]} groups")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} disagree on K")
    m_sizes = torch.diff(offs, prepend=offs.new_zeros(1)).to(torch.int32)
    w_info = ArgInfo((b.shape[0], b.shape[2], b.shape[1]), str(b.dtype).replace("torch.", ""),
                     str(b.device))
    from gg_spec import checks
    dims = checks.check_forward(_validate.describe(a), w_info, _validate.describe(m_sizes),
                                None, 1, permute_x=False, permute_y=False, topk_weights=None,
                                fuse_mul_post=False)
    _validate.check_device(a, "a")
    _validate.check_values(dims, m_sizes, None)
    # configs as grouped_gemm picks them (user's cache, shipped table for this card, default);
    # the weight gradient runs the dW kernel with the operands' roles swapped (_ops), so its
    # key has N and K swapped
    e, n, k, m = dims.num_experts, dims.n, dims.k, dims.m
    keys = {"forward": dims, "dX": dims, "dW": Dims(e, k, n, m, m, m)}
    given = {"forward": forward_config, "dX": dx_config, "dW": dw_config}
    configs = [given[op] or autotune.lookup(autotune.key_for(op, keys[op], a.dtype, a.device))
               for op in ("forward", "dX", "dW")]
    for cfg, op in zip(configs, ("forward", "dX", "dW")):
        _validate.check_config(op, cfg, permute_x=False, permute_y=False, dtype=a.dtype)
    return _ops.grouped_mm(a, b, m_sizes, *[_ops.encode(c) for c in configs])
