"""Config choice and autotuning: the cached or shipped config of a problem, or time gg_spec's
candidate configs on the GPU and cache the fastest.

With no config given, every call (``autotune=False``, the default, included) that runs the
Triton lowering takes ``lookup_config``, i.e. ``gg_spec.tuning_cache.lookup`` with backend
name ``"pallas"``: the user's cache (exact ``gg_spec.tuning_key``), else the table shipped for
this card (same op, shape, dtype and fusions, nearest row bucket), else the default config;
memoised per key. ``tune(...)`` tunes the ops of one problem (forward, dX, dW) and records
each choice in the user's cache; ``grouped_gemm(..., autotune=True)`` tunes a key that
neither the cache nor the shipped table holds exactly, one process at a time
(``tuning_cache.tuning_lock``; the others run the lookup's answer meanwhile). Interpreted runs
(no GPU) are never timed: they take the lookup's answer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import gg_spec
import gg_spec.rounds
from gg_spec import checks, tuning_cache
from pallas_gg._backend import (device_label, resolve_backend, triton_lowering_module,
                                use_interpreter)
from pallas_gg._validate import arg_infos, as_array, check_routing_values, is_traced

CACHE_BACKEND = "pallas"
OPS = ("forward", "dX", "dW")


def _key(op, *, num_experts, n, k, rows, dtype, permute_x, permute_y, fuse_mul_post):
    return gg_spec.tuning_key(op, num_experts=num_experts, n=n, k=k, rows=rows,
                              dtype=dtype, permute_x=permute_x, permute_y=permute_y,
                              fuse_mul_post=fuse_mul_post and op == "forward",
                              device=device_label())


def _cached(op, key, fusions=None):
    """The config of `key` in the user's cache or the shipped table (exact key, valid for the
    key's fusions: ``tuning_cache.find``), or None."""
    return tuning_cache.find(CACHE_BACKEND, key, nearest=False)


def lookup_config(op, *, num_experts, n, k, rows, dtype, permute_x, permute_y,
                  fuse_mul_post=False):
    """The config of a call that gives none and does not tune (``tuning_cache.lookup``: the
    user's cache, the shipped table at the nearest row bucket, the default config)."""
    return tuning_cache.lookup(CACHE_BACKEND, _key(
        op, num_experts=num_experts, n=n, k=k, rows=rows, dtype=jnp.dtype(dtype).name,
        permute_x=permute_x, permute_y=permute_y, fuse_mul_post=fuse_mul_post))


def _host_ms(fn, iters: int) -> float:
    """Mean milliseconds of fn() over ``iters`` back-to-back calls, host clock: the timer of
    interpreted runs (the tests of the tuning loop), which have no GPU kernels to time."""
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) * 1e3 / iters


def kernel_ms(jitted, *args, iterations: int) -> float:
    """Median over ``iterations`` calls of the summed durations of the kernels that one call
    of the jitted function ``jitted(*args)`` runs (CUPTI): device time, not host time. The
    tuner's timer and the benchmarks' (``benchmarks.timing.time_jax``). The arrays must be
    arguments: a function closing over them would be jitted here with them as constants."""
    from jax.experimental.mosaic.gpu import profiler
    _, times = profiler.measure(jitted, iterations=iterations)(*args)
    if times is None:
        raise RuntimeError("no kernel ran")
    return statistics.median([times] if isinstance(times, float) else times)


def _kernel_ms(launch: _Launch, iters: int) -> float:
    return kernel_ms(launch.jitted, *launch.args, iterations=iters)


def _warm(fn) -> None:
    jax.block_until_ready(fn())


def _outside_any_trace(fn):
    """Run ``fn()`` where no JAX trace is active: JAX's trace state is per thread, so a fresh
    thread runs eagerly even while the caller is being traced by jax.jit (autotune=True
    inside a jitted function)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


class _Problem:
    """Concrete inputs of one problem for timing; synthetic (balanced routing, random data)
    for the arrays that are not concrete (autotuning under jax.jit)."""

    def __init__(self, X, W, m_sizes, gather, topk, topk_weights, permute_x):
        num_experts, n, k = W.shape
        rows = gather.shape[0] if permute_x else X.shape[0]
        rng = np.random.default_rng(0)
        dtype = X.dtype

        def concrete(a, make):
            return make() if a is None or is_traced(a) else a

        self.x = concrete(X, lambda: jnp.asarray(rng.standard_normal(X.shape), dtype))
        self.w = concrete(W, lambda: jnp.asarray(rng.standard_normal(W.shape) / np.sqrt(k),
                                                 dtype))
        base, extra = divmod(rows, num_experts)
        balanced = np.array([base + (e < extra) for e in range(num_experts)], np.int32)
        self.m_sizes = concrete(m_sizes, lambda: jnp.asarray(balanced))
        self.gather = concrete(gather, lambda: jnp.asarray(rng.permutation(rows), jnp.int32))
        self.gather = self.gather.astype(jnp.int32)
        routed = X.shape[0] * topk if permute_x else rows
        self.weights = concrete(topk_weights,
                                lambda: jnp.asarray(rng.random(routed), jnp.float32))
        self.dy = jnp.asarray(rng.standard_normal((rows, n)), dtype)
        self.rows = rows


class _Launch:
    """One candidate's call: a jitted function of the problem's arrays, which are passed as
    arguments (a function closing over them, jitted by the CUPTI timer, would bake every
    array into its program as a constant: W alone is 0.8-2.7 GB at the real shapes)."""

    def __init__(self, fn, *args):
        self.jitted, self.args = jax.jit(fn), args

    def __call__(self):
        return self.jitted(*self.args)


def _launcher(op, problem, topk, fusions, fuse_mul_post, config, interpret=False):
    p = problem
    px, py = fusions["permute_x"], fusions["permute_y"]
    triton_lowering = triton_lowering_module()  # imported on first use: a JAX may lack it
    if op == "forward":
        return _Launch(lambda x, w, ms, g, weights: triton_lowering.forward(
            x, w, ms, g, weights, topk=topk, num_rows=p.rows, permute_x=px, permute_y=py,
            fuse_mul_post=fuse_mul_post, config=config, interpret=interpret),
            p.x, p.w, p.m_sizes, p.gather, p.weights if fuse_mul_post else None)
    if op == "dX":
        return _Launch(lambda dy, w, ms, g: triton_lowering.dx(
            dy, w, ms, g, num_rows=p.rows, permute_x=px, permute_y=py, config=config,
            interpret=interpret), p.dy, p.w, p.m_sizes, p.gather)
    return _Launch(lambda x, dy, ms, g: triton_lowering.dw(
        x, dy, ms, g, topk=topk, permute_x=px, permute_y=py, config=config,
        interpret=interpret), p.x, p.dy, p.m_sizes, p.gather)


def _honoured(candidates):
    """The candidates as this backend runs them: fields it ignores (warp_specialize, the
    TMA switches) reset, duplicates dropped, so no config is timed twice."""
    out = []
    for config in candidates:
        ignored = {f.name: False for f in dataclasses.fields(config)
                   if f.name == "warp_specialize" or f.name.startswith("tma_")}
        config = config.replace(**ignored)
        if config not in out:
            out.append(config)
    return out


def _tune_op(op, problem, topk, fusions, fuse_mul_post, *, iters: int, candidates=None,
             interpret=False, rounds: int = 3):
    """(fastest config, its ms) among ``candidates`` (default gg_spec.valid_candidates),
    timed in interleaved, rotated rounds (``gg_spec.rounds``: every candidate in the same
    clock state) by its kernels' device time; candidates that fail to compile (e.g. too
    much shared memory) are skipped. The search-space order breaks ties."""
    dtype = jnp.dtype(problem.x.dtype).name  # candidates that fit shared memory for it
    if dtype not in gg_spec.configs.ELEMENT_SIZES:
        dtype = None
    if candidates is None:
        candidates = _honoured(gg_spec.valid_candidates(op, dtype=dtype, **fusions))
    timer = _host_ms if interpret else _kernel_ms
    measured = gg_spec.rounds.time_in_rounds(
        {config: _launcher(op, problem, topk, fusions, fuse_mul_post, config, interpret)
         for config in candidates},
        burst=lambda fn: timer(fn, iters), warm=_warm, warmup=2, rounds=rounds)
    best, best_ms = None, float("inf")
    for config in candidates:
        ms = measured.get(config)
        if ms is not None and not isinstance(ms, BaseException) and ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        return gg_spec.default_config(op, dtype), None
    return best, best_ms


def autotuned_config(op, X, W, m_sizes, gather_indices, topk, *, permute_x, permute_y,
                     topk_weights, fuse_mul_post, interpret, iters: int = 20):
    """The cached (or shipped) config of this problem's exact key; on a miss the fastest
    candidate (timed on the GPU and cached, by the one process that holds the key's tuning
    lock) or, when interpreted or while another process tunes the key, ``lookup``'s answer
    (the shipped table's nearest row bucket, else the default config)."""
    num_experts, n, k = W.shape
    rows = gather_indices.shape[0] if permute_x else X.shape[0]
    fusions = dict(permute_x=permute_x, permute_y=permute_y)
    key = _key(op, num_experts=num_experts, n=n, k=k, rows=rows,
               dtype=jnp.dtype(X.dtype).name, fuse_mul_post=fuse_mul_post, **fusions)
    config = _cached(op, key, fusions)
    if config is not None:
        return config
    if interpret:
        return tuning_cache.lookup(CACHE_BACKEND, key)
    # Under jax.jit the arrays are tracers and every jnp op would be staged into the caller's
    # program: time (synthetic stand-ins for the traced arrays) in a thread of its own.
    def measure():
        problem = _Problem(X, W, m_sizes, gather_indices, topk, topk_weights, permute_x)
        return _tune_op(op, problem, topk, fusions, fuse_mul_post and op == "forward",
                        iters=iters)

    with tuning_cache.tuning_lock(CACHE_BACKEND, key) as mine:
        if not mine:  # another process (or thread) tunes this key now
            return tuning_cache.lookup(CACHE_BACKEND, key)
        config = tuning_cache.find(CACHE_BACKEND, key, nearest=False, fresh=True)
        if config is not None:  # stored by the previous holder of the lock
            return config
        config, ms = _outside_any_trace(measure)
        if ms is not None:
            tuning_cache.store(CACHE_BACKEND, key, config, ms)
    return config


def tune(X, W, m_sizes, gather_indices, topk, *, permute_x=False, permute_y=False,
         topk_weights=None, fuse_mul_post=False, ops=OPS, force=False, iters=20,
         backend="auto"):
    """Tune the configs of one grouped-GEMM problem; returns {op: config}.

    Arguments as ``grouped_gemm`` (X [M, K] or [T, K], W [E, N, K], m_sizes [E],
    gather_indices [M], topk_weights [M]). For each op in ``ops`` the cached (or shipped)
    choice of the exact key is returned unless ``force``; otherwise every valid candidate is
    timed on the GPU and the fastest is cached (while another process tunes the same key,
    this waits for it and takes its result). Without a GPU nothing is timed: ``lookup``'s
    answer comes back (cache, shipped table at the nearest row bucket, default config).
    """
    resolve_backend(backend)
    X, W, m_sizes, gather_indices, topk_weights = map(
        as_array, (X, W, m_sizes, gather_indices, topk_weights))
    info = arg_infos(X=X, W=W, m_sizes=m_sizes, gather_indices=gather_indices,
                     topk_weights=topk_weights)
    if gather_indices is None:
        raise ValueError("tune needs gather_indices (the routing of the problem to time)")
    dims = checks.check_forward(info["X"], info["W"], info["m_sizes"], info["gather_indices"],
                                topk, permute_x=permute_x, permute_y=permute_y,
                                topk_weights=info["topk_weights"], fuse_mul_post=fuse_mul_post)
    check_routing_values(dims, m_sizes, gather_indices,  # the candidates would run on them
                         fused=permute_x or permute_y or fuse_mul_post)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ValueError(f"ops must be among {OPS}, got {sorted(unknown)}")
    interpret = use_interpreter(X, W)
    fusions = dict(permute_x=permute_x, permute_y=permute_y)
    num_experts, n, k = W.shape
    rows = gather_indices.shape[0] if permute_x else X.shape[0]
    problem = None
    out = {}
    for op in ops:
        mul = fuse_mul_post and op == "forward"
        key = _key(op, num_experts=num_experts, n=n, k=k, rows=rows,
                   dtype=jnp.dtype(X.dtype).name, fuse_mul_post=mul, **fusions)
        config = None if force else _cached(op, key, fusions)
        if config is None and interpret:
            config = tuning_cache.lookup(CACHE_BACKEND, key)
        if config is None:
            # waits while another process tunes this key, then takes its result
            with tuning_cache.tuning_lock(CACHE_BACKEND, key, blocking=True):
                if not force:
                    config = tuning_cache.find(CACHE_BACKEND, key, nearest=False, fresh=True)
                if config is None:
                    if problem is None:
                        problem = _outside_any_trace(lambda: _Problem(
                            X, W, m_sizes, gather_indices, topk, topk_weights, permute_x))
                    config, ms = _outside_any_trace(
                        lambda: _tune_op(op, problem, topk, fusions, mul, iters=iters))
                    if ms is not None:
                        tuning_cache.store(CACHE_BACKEND, key, config, ms)
        out[op] = config
    return out
