"""Device-time measurement, one method per framework, the same L2 state for every
implementation (warm: the inputs of the previous call are what the cache holds).

* torch: CUDA events around `inner` back-to-back calls, median over `reps` repetitions;
  `python -m benchmarks` times a shape's implementations in interleaved rounds
  (``time_torch_interleaved``) so that all of them see the same clock state.
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

    from triton_gg.timing import burst_ms
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(burst_ms(fn, inner) for _ in range(reps))


def time_torch_interleaved(fns: dict, *, warmup: int = 3, inner: int = 10,
                           reps: int = 7) -> dict:
    """Median milliseconds per call of each of `fns` ({name: fn}), measured in rounds: each
    repetition times every function once (`inner` back-to-back calls, CUDA events), so all
    of them see the same clock state (the H200's SM clock falls under sustained load:
    1905 -> 1440 MHz measured during a 2.3 ms GEMM timed back to back, benchmarks/NOTES.md
    step 13), and repetition r starts r places down the list (position in a round moved
    identical kernels by 2-5%, step 15). A function that raises (in warm-up or in a round)
    is reported as its exception instead of a time. The same measurement as triton_gg's
    tuner (``triton_gg.timing.time_in_rounds``)."""
    from triton_gg.timing import time_in_rounds
    return time_in_rounds(fns, warmup=warmup, rounds=reps, calls=inner)


def time_jax(fn: Callable, *args, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of the kernels that one call of the jitted `fn(*args)` runs
    (``pallas_gg.tuning.kernel_ms``, the timer of pallas_gg's tuner)."""
    import jax

    from pallas_gg.tuning import kernel_ms
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    return kernel_ms(fn, *args, iterations=reps)
