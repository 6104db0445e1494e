"""Input checks shared by both backends, framework-neutral.

Each backend describes its arguments as ``ArgInfo`` (shape, dtype name, device name) and calls
the check for its op before any launch. Shape, dtype and device problems are found without
touching the data and always run. The value checks (``sum(m_sizes)``, gather indices in range
and each once) need five numbers that the backend reads off the device in one transfer (a
host sync), so they are opt-in (``set_value_checks(True)``, ``GG_VALUE_CHECKS=1``) and are
skipped under tracing (``torch.compile``, ``jax.jit``), where values are not known.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
from dataclasses import dataclass

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int32", "int64")


@dataclass(frozen=True)
class ArgInfo:
    shape: tuple
    dtype: str
    device: str = "cpu"

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Dims:
    """Sizes of one call: E experts, N, K, M routed rows (expert-order positions),
    T tokens (rows of X with permute_x), R routed rows addressed by gather indices."""

    num_experts: int
    n: int
    k: int
    m: int
    tokens: int
    routed_rows: int


def _env_flag(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


# Off by default: a value check reads the device from the host, which drains the launch
# queue (4-53% of a forward on an H200) and cannot be captured in a CUDA graph. The kernels
# are memory-safe for any routing values without it (wrong numbers, never an access outside
# the tensors); the checks are a debugging aid that names the bad value.
_value_checks_enabled = _env_flag(os.environ.get("GG_VALUE_CHECKS"))


def set_value_checks(enabled: bool) -> bool:
    """Turn the eager value checks on or off; returns the previous setting.

    Off by default. On (``set_value_checks(True)`` or ``GG_VALUE_CHECKS=1``), every eager
    call reads five numbers off the device (sum and minimum of ``m_sizes``; minimum, maximum
    and distinct count of the gather indices where a fusion reads them) and raises a
    ValueError naming a bad one. That read is a host sync per call: it costs a large part
    of a GEMM's time, breaks CUDA graph capture and ``set_sync_debug_mode("error")``. Use
    it to debug routing, not in a training loop. Skipped under ``torch.compile`` /
    ``jax.jit`` tracing, where values are not known."""
    global _value_checks_enabled
    previous, _value_checks_enabled = _value_checks_enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def value_checks(enabled: bool = True):
    """``with value_checks(): ...`` runs the block with the value checks on (or off)."""
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


_trusted = threading.local()


def value_checks_enabled() -> bool:
    return _value_checks_enabled and not getattr(_trusted, "depth", 0)


@contextlib.contextmanager
def routing_trusted():
    """Skip the value checks inside: for callers that built ``m_sizes`` and the gather
    indices themselves on the device (the MoE expert blocks, from ``route``), whose values
    are right by construction and whose check would cost a host sync per GEMM."""
    _trusted.depth = getattr(_trusted, "depth", 0) + 1
    try:
        yield
    finally:
        _trusted.depth -= 1


def _fail(msg: str):
    raise ValueError(msg)


def _check_float(name: str, a: ArgInfo, dtype: str | None = None):
    if a.dtype not in FLOAT_DTYPES:
        _fail(f"{name} must have a dtype in {FLOAT_DTYPES}, got {a.dtype} (shape {a.shape})")
    if dtype is not None and a.dtype != dtype:
        _fail(f"{name} has dtype {a.dtype} but the other operand has {dtype}; "
              f"cast them to one dtype")


def _check_ndim(name: str, a: ArgInfo, ndim: int, layout: str):
    if a.ndim != ndim:
        _fail(f"{name} must be {ndim}-D {layout}, got shape {a.shape}")


def _check_routing(m_sizes: ArgInfo, gather: ArgInfo | None, topk, num_experts: int,
                   m: int, need_gather: bool, why: str):
    _check_ndim("m_sizes", m_sizes, 1, "[E]")
    if m_sizes.shape[0] != num_experts:
        _fail(f"m_sizes has {m_sizes.shape[0]} entries (shape {m_sizes.shape}) but W has "
              f"{num_experts} experts")
    if m_sizes.dtype not in INDEX_DTYPES:
        _fail(f"m_sizes must be int32 or int64, got {m_sizes.dtype}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        _fail(f"topk must be a positive int, got {topk!r}")
    if gather is None:
        if need_gather:
            _fail(f"gather_indices is required with {why}")
        return
    _check_ndim("gather_indices", gather, 1, "[M]")
    if gather.dtype not in INDEX_DTYPES:
        _fail(f"gather_indices must be int32 or int64, got {gather.dtype}")
    if gather.shape[0] != m:
        _fail(f"gather_indices has {gather.shape[0]} entries (shape {gather.shape}) but "
              f"there are M={m} routed rows")


def _check_tokens_times_topk(x: ArgInfo, gather: ArgInfo | None, topk, m: int,
                             permute_x: bool):
    """With permute_x, X holds the T tokens and there are M = T * topk routed rows: a topk
    that disagrees would gather the wrong rows (gather_indices[p] // topk) silently."""
    if permute_x and gather is not None and x.shape[0] * topk != m:
        _fail(f"with permute_x, X has T={x.shape[0]} tokens (shape {x.shape}) and topk={topk}, "
              f"so there are T*topk={x.shape[0] * topk} routed rows, but gather_indices has "
              f"M={m} entries (it must hold every routed row, as route() gives: a rank's "
              f"dropped slots sorted last, not left out)")


def check_devices(**args: ArgInfo | None):
    """All the given arguments (None: absent) on one device."""
    devices = {name: a.device for name, a in args.items() if a is not None}
    if len(set(devices.values())) > 1:
        _fail(f"all arguments must be on one device, got {devices}")


def _why(permute_x, permute_y, fuse_mul_post) -> str:
    return " and ".join(n for n, on in (("permute_x", permute_x), ("permute_y", permute_y),
                                        ("fuse_mul_post", fuse_mul_post)) if on)


def _check_permutes(permute_x, permute_y):
    if permute_x and permute_y:
        _fail("permute_x and permute_y cannot both be set")


def check_forward(x: ArgInfo, w: ArgInfo, m_sizes: ArgInfo, gather: ArgInfo | None, topk,
                  *, permute_x: bool, permute_y: bool, topk_weights: ArgInfo | None,
                  fuse_mul_post: bool) -> Dims:
    """Shapes for Y = grouped_gemm_forward(X, W, ...); returns the call's Dims."""
    _check_permutes(permute_x, permute_y)
    _check_ndim("W", w, 3, "[E, N, K]")
    _check_ndim("X", x, 2, "[T, K]" if permute_x else "[M, K]")
    _check_float("X", x)
    _check_float("W", w, x.dtype)
    e, n, k = w.shape
    if x.shape[1] != k:
        _fail(f"X has K={x.shape[1]} columns (shape {x.shape}) but W {w.shape} expects K={k}")
    m = gather.shape[0] if (permute_x and gather is not None) else x.shape[0]
    _check_routing(m_sizes, gather, topk, e, m, permute_x or permute_y or fuse_mul_post,
                   _why(permute_x, permute_y, fuse_mul_post))
    _check_tokens_times_topk(x, gather, topk, m, permute_x)
    tokens = x.shape[0] if permute_x else m
    routed = tokens * topk if permute_x else m
    if fuse_mul_post:
        if topk_weights is None:
            _fail("topk_weights is required with fuse_mul_post")
        _check_ndim("topk_weights", topk_weights, 1, "[M] (routed-row order)")
        if topk_weights.shape[0] != routed:
            _fail(f"topk_weights has {topk_weights.shape[0]} entries (shape "
                  f"{topk_weights.shape}) but there are {routed} routed rows")
        if topk_weights.dtype not in FLOAT_DTYPES:
            _fail(f"topk_weights must be a float dtype, got {topk_weights.dtype}")
    check_devices(X=x, W=w, m_sizes=m_sizes, gather_indices=gather,
                   topk_weights=topk_weights if fuse_mul_post else None)
    return Dims(e, n, k, m, tokens, routed)


def check_dX(dy: ArgInfo, w: ArgInfo, m_sizes: ArgInfo, gather: ArgInfo | None, topk,
             *, permute_x: bool, permute_y: bool) -> Dims:
    """Shapes for dX = grouped_gemm_dX(dY, W, ...)."""
    _check_permutes(permute_x, permute_y)
    _check_ndim("W", w, 3, "[E, N, K]")
    _check_ndim("dY", dy, 2, "[M, N]")
    _check_float("dY", dy)
    _check_float("W", w, dy.dtype)
    e, n, k = w.shape
    if dy.shape[1] != n:
        _fail(f"dY has N={dy.shape[1]} columns (shape {dy.shape}) but W {w.shape} has N={n}")
    m = dy.shape[0]
    _check_routing(m_sizes, gather, topk, e, m, permute_x or permute_y,
                   _why(permute_x, permute_y, False))
    check_devices(dY=dy, W=w, m_sizes=m_sizes, gather_indices=gather)
    tokens = m // topk if permute_x else m
    if permute_x and m % topk:
        _fail(f"with permute_x, M={m} routed rows must be a multiple of topk={topk}")
    return Dims(e, n, k, m, tokens, m)


def check_dW(x: ArgInfo, dy: ArgInfo, m_sizes: ArgInfo, gather: ArgInfo | None, topk,
             *, permute_x: bool, permute_y: bool) -> Dims:
    """Shapes for dW = grouped_gemm_dW(X, dY, ...)."""
    _check_permutes(permute_x, permute_y)
    _check_ndim("X", x, 2, "[T, K]" if permute_x else "[M, K]")
    _check_ndim("dY", dy, 2, "[M, N]")
    _check_float("X", x)
    _check_float("dY", dy, x.dtype)
    m = dy.shape[0]
    if not permute_x and x.shape[0] != m:
        _fail(f"X has {x.shape[0]} rows (shape {x.shape}) but dY has M={m} (shape {dy.shape})")
    _check_routing(m_sizes, gather, topk, m_sizes.shape[0] if m_sizes.ndim == 1 else -1, m,
                   permute_x or permute_y, _why(permute_x, permute_y, False))
    _check_tokens_times_topk(x, gather, topk, m, permute_x)
    check_devices(X=x, dY=dy, m_sizes=m_sizes, gather_indices=gather)
    tokens = x.shape[0] if permute_x else m
    routed = tokens * topk if permute_x else m
    return Dims(m_sizes.shape[0], dy.shape[1], x.shape[1], m, tokens, routed)


def check_values(dims: Dims, m_sizes_sum: int, m_sizes_min: int, gather_min: int | None,
                 gather_max: int | None, gather_distinct: int | None = None) -> None:
    """The value checks, from numbers the backend read off the device in one transfer:
    sum and minimum of m_sizes; minimum, maximum and the number of distinct values (of the
    indices clamped into range) of gather_indices. An empty m_sizes has sum 0 and minimum
    0."""
    if m_sizes_min < 0:
        _fail(f"m_sizes must be non-negative, got a minimum of {m_sizes_min}")
    if m_sizes_sum != dims.m:
        _fail(f"sum(m_sizes)={m_sizes_sum} must equal the M={dims.m} routed rows")
    if gather_min is not None and dims.m > 0:
        if gather_min < 0 or gather_max >= dims.routed_rows:
            _fail(f"gather_indices must lie in [0, {dims.routed_rows}), got range "
                  f"[{gather_min}, {gather_max}]")
        # M indices in [0, M) are a permutation when M of them are distinct; a repeated
        # index makes a scatter (permute_y, dX with permute_x) leave a row unwritten
        if gather_distinct is not None and gather_distinct != dims.m:
            _fail(f"gather_indices must be a permutation of [0, {dims.routed_rows}) (route() "
                  f"builds one), but only {gather_distinct} of its {dims.m} entries are "
                  f"distinct")


def check_layer_sizes(**sizes) -> None:
    """The sizes of a new expert layer (num_experts, hidden_size, intermediate_size): each a
    positive integer (numpy and 0-d tensor integers too)."""
    for name, value in sizes.items():
        try:
            size = operator.index(value)
        except TypeError:
            size = None
        if size is None or isinstance(value, bool) or size < 1:
            _fail(f"{name} must be a positive int, got {value!r}")


def check_topk_ids(shape: tuple, dtype: str, num_experts) -> None:
    """Shapes for route(topk_ids, num_experts)."""
    if len(shape) != 2:
        _fail(f"topk_ids must be 2-D [T, k], got shape {shape}")
    if dtype not in INDEX_DTYPES and dtype not in ("int8", "int16", "uint8"):
        _fail(f"topk_ids must be an integer dtype, got {dtype}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        _fail(f"num_experts must be a positive int, got {num_experts!r}")
