"""Config choice: a given config, the tuned one (autotune=True), or the default.

The candidates are gg_spec's search space, each also with every legal TMA switch on. Of the
TMA store switches only dW's is honoured (a dW tile never straddles experts); a forward or
dX tile can, and a tile store cannot be masked by rows.

Tuning times every valid candidate of gg_spec's search space on the actual inputs (CUDA-event
medians in interleaved rounds of back-to-back calls: ``timing.time_in_rounds``), keeps the
fastest, and caches it in memory and on disk under ``gg_spec.tuning_key`` (E, N, K,
fusions, dtype, routed-row bucket, device name), so a second process does not tune again.
Interpreted (CPU) runs do not time anything: their timings say nothing about a GPU, so they
use a cached choice if one exists, else the default. Under torch.compile tracing, tuning is not possible either: cached or default.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

import gg_spec
from gg_spec import tuning_cache
from triton_gg.timing import time_in_rounds

BACKEND = "triton"
_memory: dict[str, object] = {}


@functools.lru_cache(maxsize=None)
def _device_name_of(kind: str, index: int | None) -> str:
    if kind == "cuda":
        return torch.cuda.get_device_name(index).replace(" ", "_")
    return kind


def _device_name(device: torch.device) -> str:
    return _device_name_of(device.type, device.index)


def key_for(op: str, dims, dtype: torch.dtype, device: torch.device, *, permute_x=False,
            permute_y=False, fuse_mul_post=False) -> str:
    return gg_spec.tuning_key(op, num_experts=dims.num_experts, n=dims.n, k=dims.k,
                              rows=dims.m, dtype=str(dtype).replace("torch.", ""),
                              permute_x=permute_x, permute_y=permute_y,
                              fuse_mul_post=fuse_mul_post, device=_device_name(device))


_MISSING = object()


def cached(key: str):
    """The tuned config for `key` from memory or disk; None if never tuned. The disk is read
    once per key and process (a miss is remembered too: no file read on every call)."""
    found = _memory.get(key, _MISSING)
    if found is _MISSING:
        found = tuning_cache.load(BACKEND, key)
        _memory[key] = found
    return found


def tune(op: str, key: str, run_with: Callable[[object], object], *, permute_x=False,
         permute_y=False, timer: Callable[[Callable[[], object]], float] | None = None):
    """Time each valid candidate with `run_with(config)`, cache and return the fastest.

    Candidates are timed together in interleaved rounds (``timing.time_in_rounds``: a
    short burst per candidate would time each near the boost clock, favouring tiles that
    lose once the clock has fallen under sustained load); one that fails to compile or run
    is left out, since tuning runs inside a user's first call and must not end it.
    `timer(fn) -> ms`, where given, times them one by one instead (tests pass a fake
    one)."""
    candidates = gg_spec.valid_candidates(op, permute_x=permute_x, permute_y=permute_y,
                                          with_tma=True)
    if timer is None:
        measured = time_in_rounds({c: functools.partial(run_with, c) for c in candidates})
        times = {c: ms for c, ms in measured.items() if not isinstance(ms, Exception)}
    else:
        times = {}
        for config in candidates:
            try:
                times[config] = timer(lambda: run_with(config))
            except Exception:  # a candidate that does not compile on this GPU
                continue
    best, best_ms = None, math.inf
    for config in candidates:  # the search-space order breaks ties
        if times.get(config, math.inf) < best_ms:
            best, best_ms = config, times[config]
    if best is None:
        best = gg_spec.default_config(op)
    _memory[key] = best
    tuning_cache.store(BACKEND, key, best, None if math.isinf(best_ms) else best_ms)
    return best


def choose(op: str, config, autotune: bool, key_fn: Callable[[], str],
           run_with: Callable[[object], object], device: torch.device, *, permute_x=False,
           permute_y=False):
    """The config to run: the given one, else tuned/cached with autotune, else default."""
    if config is not None:
        return config
    if not autotune:
        return gg_spec.default_config(op)
    key = key_fn()
    found = cached(key)
    if found is not None:
        return found
    if device.type != "cuda" or torch.compiler.is_compiling():
        return gg_spec.default_config(op)
    return tune(op, key, run_with, permute_x=permute_x, permute_y=permute_y)
