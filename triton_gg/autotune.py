"""Config choice: a given config, else the tuned one (``gg_spec.tuning_cache``), else tuning
(autotune=True), else the default.

With no config given, every call (``autotune=False``, the default, included) takes
``gg_spec.tuning_cache.lookup``: the user's cache (exact key), else the table shipped for this
card (same op, shape, dtype and fusions, nearest row bucket), else the default config; the
answer is memoised per key. With autotune=True a key that neither the cache nor the shipped
table holds exactly is tuned, by one process at a time (``tuning_cache.tuning_lock``; the
others run the lookup's answer meanwhile).

The candidates are gg_spec's search space, each also with every legal TMA switch on. Of the
TMA store switches only dW's is honoured (a dW tile never straddles experts); a forward or
dX tile can, and a tile store cannot be masked by rows.

Tuning times every valid candidate of gg_spec's search space on the actual inputs (CUDA-event
medians in interleaved rounds of back-to-back calls: ``timing.time_in_rounds``), keeps the
fastest, and caches it in memory and on disk under ``gg_spec.tuning_key`` (E, N, K,
fusions, dtype, routed-row bucket, device name), so a second process does not tune again.
Interpreted (CPU) runs do not time anything: their timings say nothing about a GPU, so they
take the lookup's answer. Under torch.compile tracing, tuning is not possible either: the
lookup's answer.
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


# Under torch.compile the answers are computed at trace time and enter the graph as
# constants (dynamo cannot trace the file reads of a first call of a key).
@torch.compiler.assume_constant_result
def cached(key: str):
    """The tuned config for `key` (user's cache or shipped table, exact key, valid for the
    key's fusions) from memory or disk; None if neither holds it. The disk is read once per
    key and process (a miss is remembered too: no file read on every call)."""
    found = _memory.get(key, _MISSING)
    if found is _MISSING:
        found = tuning_cache.find(BACKEND, key, nearest=False)
        _memory[key] = found
    return found


@torch.compiler.assume_constant_result
def lookup(key: str):
    """The config of a call without one and without tuning: ``tuning_cache.lookup`` (user's
    cache, shipped table at the nearest row bucket, default), memoised per key."""
    return tuning_cache.lookup(BACKEND, key)


def tune(op: str, key: str, run_with: Callable[[object], object], *, permute_x=False,
         permute_y=False, timer: Callable[[Callable[[], object]], float] | None = None):
    """Time each valid candidate with `run_with(config)`, cache and return the fastest.

    Candidates are timed together in interleaved rounds (``timing.time_in_rounds``: a
    short burst per candidate would time each near the boost clock, favouring tiles that
    lose once the clock has fallen under sustained load); one that fails to compile or run
    is left out, since tuning runs inside a user's first call and must not end it.
    `timer(fn) -> ms`, where given, times them one by one instead (tests pass a fake
    one)."""
    dtype = gg_spec.configs.key_dtype(key)  # candidates that fit shared memory for it
    candidates = gg_spec.valid_candidates(op, permute_x=permute_x, permute_y=permute_y,
                                          with_tma=True, dtype=dtype)
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
        best = gg_spec.default_config(op, dtype)
    _memory[key] = best
    tuning_cache.store(BACKEND, key, best, None if math.isinf(best_ms) else best_ms)
    return best


def choose(op: str, config, autotune: bool, key_fn: Callable[[], str],
           run_with: Callable[[object], object], device: torch.device, *, permute_x=False,
           permute_y=False):
    """The config to run: the given one; else the cached or shipped one (``lookup``); with
    autotune a key held by neither is tuned (on a GPU, outside tracing, by the process that
    gets the key's tuning lock: the others run the lookup's answer for this call)."""
    if config is not None:
        return config
    key = key_fn()
    if not autotune:
        return lookup(key)
    found = cached(key)
    if found is not None:
        return found
    if device.type != "cuda" or torch.compiler.is_compiling():
        return lookup(key)
    with tuning_cache.tuning_lock(BACKEND, key) as mine:
        if not mine:  # another process (or thread) tunes this key now
            return lookup(key)
        found = tuning_cache.find(BACKEND, key, nearest=False, fresh=True)
        if found is not None:  # stored by the previous holder of the lock
            _memory[key] = found
            return found
        return tune(op, key, run_with, permute_x=permute_x, permute_y=permute_y)
