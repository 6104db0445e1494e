"""Config choice: a given config, the tuned one (autotune=True), or the default.

The candidates are gg_spec's search space, each also with every legal TMA switch on. Of the
TMA store switches only dW's is honoured (a dW tile never straddles experts); a forward or
dX tile can, and a tile store cannot be masked by rows.

Tuning times every valid candidate of gg_spec's search space on the actual inputs (CUDA-event
medians in interleaved rounds of back-to-back calls: ``_time_in_rounds``), keeps the fastest,
and caches it in memory and on disk under ``gg_spec.tuning_key`` (E, N, K, fusions, dtype,
routed-row bucket, device name), so a second process does not tune again. Interpreted (CPU)
runs do not time anything: their timings say nothing about a GPU, so they use a cached
choice if one exists, else the default.
Under torch.compile tracing, tuning is not possible either: cached or default.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Callable

import torch

import gg_spec
from gg_spec import tuning_cache

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


def _time_in_rounds(runs: dict, *, rounds: int = 5, calls: int = 10) -> dict:
    """Milliseconds per call of each candidate ({config: fn}), measured in interleaved
    rounds: every round times each candidate over `calls` back-to-back calls (CUDA events),
    and the median over rounds is kept. Why not one candidate after the other: under
    sustained tensor-core load the H200's SM clock falls (1905 -> 1440 MHz measured,
    benchmarks/NOTES.md step 13), and a short burst per candidate (do_bench's 25 ms) times
    each near the boost clock, which favours tiles that lose once the clock has fallen, as
    it has in training and in the benchmark (NOTES step 14). A candidate that fails to
    compile or run (e.g. too much shared memory, or out of memory in a later round) is
    left out: tuning runs inside a user's first call and must not end it."""
    live = {}
    for config, fn in runs.items():
        try:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001  (a candidate this GPU cannot run)
            continue
        live[config] = fn
    samples = {config: [] for config in live}
    for _ in range(rounds):
        for config, fn in list(live.items()):
            try:
                samples[config].append(_burst_ms(fn, calls))
            except Exception:  # noqa: BLE001  (dropped, the others still compete)
                del live[config], samples[config]
    return {config: statistics.median(v) for config, v in samples.items()}


def _burst_ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call over `calls` back-to-back calls of `fn` (CUDA events)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def tune(op: str, key: str, run_with: Callable[[object], object], *, permute_x=False,
         permute_y=False, timer: Callable[[Callable[[], object]], float] | None = None):
    """Time each valid candidate with `run_with(config)`, cache and return the fastest.

    Candidates are timed together in interleaved rounds (``_time_in_rounds``); `timer(fn)
    -> ms`, where given, times them one by one instead (tests pass a fake one)."""
    candidates = gg_spec.valid_candidates(op, permute_x=permute_x, permute_y=permute_y,
                                          with_tma=True)
    if timer is None:
        times = _time_in_rounds({c: functools.partial(run_with, c) for c in candidates})
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
