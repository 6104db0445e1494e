"""Device-time measurement of torch callables, shared by the tuner (``autotune``) and the
benchmarks (``benchmarks/timing.py``): CUDA events around back-to-back calls, and several
callables timed in interleaved, rotated rounds (``gg_spec.rounds``: why rounds, why rotated).
"""

from __future__ import annotations

from typing import Callable

import torch

from gg_spec import rounds as _rounds


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


def _warm(fn: Callable[[], object]) -> None:
    fn()
    torch.cuda.synchronize()


def time_in_rounds(fns: dict, *, warmup: int = 3, rounds: int = 5, calls: int = 10) -> dict:
    """{key: median milliseconds per call} of the callables `fns` ({key: fn}): `warmup`
    calls each, then `rounds` rotated rounds in which every callable is timed over `calls`
    back-to-back calls (``gg_spec.rounds.time_in_rounds``). A callable that raises maps to
    its exception instead and the others go on."""
    return _rounds.time_in_rounds(fns, burst=lambda fn: burst_ms(fn, calls), warm=_warm,
                                  warmup=warmup, rounds=rounds)


rotated = _rounds.rotated
