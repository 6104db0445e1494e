"""Device-time measurement, one method per framework, the same L2 state for every
implementation (warm: the inputs of the previous call are what the cache holds).

* torch: CUDA events around `inner` back-to-back calls, median over `reps` repetitions.
* JAX: the sum of the call's kernel durations from CUPTI
  (``jax.experimental.mosaic.gpu.profiler.measure``), median over `reps` iterations.
Both exclude host work; the torch number also includes launch gaps between the calls,
which for kernels of 50 us and more is under a percent.
"""

from __future__ import annotations

import statistics
from typing import Callable


def time_torch(fn: Callable[[], object], *, warmup: int = 3, inner: int = 10,
               reps: int = 7) -> float:
    """Median milliseconds per call of `fn` (CUDA events)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def time_jax(fn: Callable, *args, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of the kernels that one call of the jitted `fn(*args)` runs."""
    import jax
    from jax.experimental.mosaic.gpu import profiler
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    _, times = profiler.measure(fn, iterations=reps)(*args)
    if times is None:
        raise RuntimeError("no kernel ran")
    if isinstance(times, float):
        times = [times]
    return statistics.median(times)
