"""Timing candidates in interleaved rounds: the algorithm both backends' tuners (and the torch
benchmarks) use, framework-neutral (each backend brings its own clock).

Why rounds: under sustained tensor-core load the H200's SM clock falls (1905 -> 1440 MHz
measured, benchmarks/NOTES.md step 13). Timing one candidate after another, or each in a
short burst near the boost clock, favours whichever ran first or loses least once the clock
has fallen; in rounds every candidate is timed in the same clock state. Why rotated: within
a round the position alone moved identical kernels by 2-5% (NOTES step 15), so round r
starts r places further down the list.
"""

from __future__ import annotations

import statistics
from typing import Callable, Hashable


def rotated(keys: list, shift: int) -> list:
    """keys rotated left by shift places (mod their number)."""
    if not keys:
        return keys
    shift %= len(keys)
    return keys[shift:] + keys[:shift]


def time_in_rounds(fns: dict[Hashable, Callable[[], object]], *,
                   burst: Callable[[Callable[[], object]], float],
                   warm: Callable[[Callable[[], object]], object],
                   warmup: int = 3, rounds: int = 5) -> dict:
    """{key: median of `burst(fn)` over the rounds} for the callables `fns`: `warmup` calls
    of `warm(fn)` each (compilation; `warm` runs fn once and waits for it), then `rounds`
    rounds, round r timing every callable once in the list's order rotated by r. A callable
    that raises, in warm-up or in any round, maps to its exception instead and the others go
    on (one failure must not end a tuning run or a benchmark)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    live, out = {}, {}
    for key, fn in fns.items():
        try:
            for _ in range(warmup):
                warm(fn)
        except Exception as e:  # noqa: BLE001  (e.g. a tile this GPU cannot run)
            out[key] = e
            continue
        live[key] = fn
    samples = {key: [] for key in live}
    for r in range(rounds):
        for key in rotated(list(live), r):
            try:
                samples[key].append(burst(live[key]))
            except Exception as e:  # noqa: BLE001  (e.g. out of memory in a later round)
                out[key] = e
                del live[key], samples[key]
    out.update({key: statistics.median(v) for key, v in samples.items()})
    return out
