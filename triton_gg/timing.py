"""Device-time measurement of torch callables, shared by the tuner (``autotune``) and the
benchmarks (``benchmarks/timing.py``): CUDA events around back-to-back calls, and several
callables timed in interleaved rounds.

Why rounds: under sustained tensor-core load the H200's SM clock falls (1905 -> 1440 MHz
measured, benchmarks/NOTES.md step 13). Timing one callable after another, or each in a
short burst near the boost clock, favours whichever ran first or loses least once the clock
has fallen; in rounds every callable is timed in the same clock state, the state of
training and of the benchmark (NOTES step 14).
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch


def burst_ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call over `calls` back-to-back calls of `fn` (CUDA events)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def time_in_rounds(fns: dict, *, warmup: int = 3, rounds: int = 5, calls: int = 10) -> dict:
    """{key: median milliseconds per call} of the callables `fns` ({key: fn}): `warmup`
    calls each, then `rounds` rounds in which every callable is timed over `calls`
    back-to-back calls. Round r starts r places further down the list (a rotation), so no
    callable always runs first or after the same neighbour: within a round the position
    alone moved identical kernels by 2-5% (benchmarks/NOTES.md step 15). A callable that
    raises, in warm-up or in any round, maps to its exception instead and the others go on
    (one failure must not end a tuning run or a benchmark)."""
    live, out = {}, {}
    for key, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (e.g. a tile this GPU cannot run)
            out[key] = e
            continue
        live[key] = fn
    samples = {key: [] for key in live}
    for r in range(rounds):
        for key in rotated(list(live), r):
            try:
                samples[key].append(burst_ms(live[key], calls))
            except Exception as e:  # noqa: BLE001  (e.g. out of memory in a later round)
                out[key] = e
                del live[key], samples[key]
    out.update({key: statistics.median(v) for key, v in samples.items()})
    return out


def rotated(keys: list, shift: int) -> list:
    """keys rotated left by shift places (mod their number)."""
    if not keys:
        return keys
    shift %= len(keys)
    return keys[shift:] + keys[:shift]
