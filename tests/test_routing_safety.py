"""Kernels are memory-safe for any routing values (DESIGN.md; issue 16).

With the value checks off, bad routing (sum(m_sizes) past M or short of it, a negative size,
a gather index out of range or repeated) may give wrong numbers but must never make a kernel
read or write outside its tensors. On a GPU such an access is an illegal address that kills
the process; here the kernels run interpreted, so the accesses are made visible:

* triton_gg: every input is a view into a larger buffer whose guard regions hold NaN (the
  inputs themselves are finite), so a read outside a view brings NaN into the output; every
  output is a view into a buffer whose guard regions hold a sentinel, so a write outside it
  changes the guards. The launchers take preallocated outputs, so these tests call them.
  (Integer guards hold -1: an index read from a guard points one row before a tensor, into
  another guard, instead of far away.)
* pallas_gg (Triton lowering, interpret mode): interpret mode clamps indices by itself, so a
  guard cannot see an access out of range; instead every masked load and store of the
  kernels is checked while they run: an unmasked lane whose index is outside its ref is
  recorded (``jax.debug.callback``), and the test asserts that none was.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

import gg_spec

triton_gg = pytest.importorskip("triton_gg")

E, TOPK, T, K, N = 4, 2, 10, 24, 40   # K, N not multiples of the blocks: tails masked
M = T * TOPK
VALID_SIZES = [6, 0, 9, 5]
FWD = gg_spec.ForwardConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
DX = gg_spec.DXConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
DW = gg_spec.DWConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)
SENTINEL = 7.0


def bad_routing(kind: str):
    """(m_sizes [E], gather_indices [M]) int32 numpy, bad in the way `kind` says."""
    sizes = list(VALID_SIZES)
    gather = np.random.default_rng(1).permutation(M).astype(np.int32)
    if kind == "sum_over":        # sums to 2M: the last expert's rows run past every tensor
        sizes[3] += M
    elif kind == "sum_short":     # the last rows belong to no expert
        sizes[3] -= 4
    elif kind == "negative":      # sum is M, but the starts of later experts go negative
        sizes = [6, -20, 9, 25]
    elif kind == "overflow":      # int32 sums wrap around
        sizes = [2**31 - 1, 2**31 - 1, 3, 3]
    elif kind == "index_over":
        gather[3] = M + 3
    elif kind == "index_negative":
        gather[3] = -3
    elif kind == "index_repeated":
        gather[3] = gather[4]
    else:
        raise ValueError(kind)
    return np.asarray(sizes, np.int32), gather


SIZE_KINDS = ["sum_over", "sum_short", "negative", "overflow"]
INDEX_KINDS = ["index_over", "index_negative", "index_repeated"]
FORWARD_MODES = ["plain", "permute_x", "permute_y", "fuse_mul_post"]
BACKWARD_MODES = ["plain", "permute_x", "permute_y"]


def cases(modes, size_kinds=SIZE_KINDS):
    """(mode, kind): every bad routing; the bad gather indices only where a gather is read."""
    return [(mode, kind) for mode in modes
            for kind in size_kinds + ([] if mode == "plain" else INDEX_KINDS)]


# Sizes whose int32 sums wrap can send an unbounded kernel so far out that the interpreter
# segfaults instead of reading a guard: those cases run in a child process
# (test_triton_overflow_in_child), so that a crash fails one test, not the session.
IN_PROCESS_KINDS = [k for k in SIZE_KINDS if k != "overflow"]


def flags(mode):
    return dict(permute_x=mode == "permute_x", permute_y=mode == "permute_y")


@pytest.fixture(autouse=True)
def value_checks_off():
    previous = gg_spec.set_value_checks(False)
    yield
    gg_spec.set_value_checks(previous)


# ------------------------------------------------------------------------ triton_gg

def guarded(values: torch.Tensor, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): a copy of `values` inside a buffer with guard regions of `fill` on
    both sides, each larger than the tensor itself (16-byte aligned, so TMA stays usable)."""
    n = values.numel()
    guard = 4 * n + 64
    buf = torch.full((2 * guard + n,), fill, dtype=values.dtype)
    view = buf[guard:guard + n].view(values.shape)
    view.copy_(values)
    return view, buf


class Outputs:
    """Zero-filled outputs in sentinel-guarded buffers."""

    def __init__(self, *shapes):
        self.pairs = [guarded(torch.zeros(s), SENTINEL) for s in shapes]
        self.views = [v for v, _ in self.pairs]

    def check(self):
        for i, (view, buf) in enumerate(self.pairs):
            guard = (buf.numel() - view.numel()) // 2
            untouched = torch.cat([buf[:guard], buf[guard + view.numel():]])
            assert bool((untouched == SENTINEL).all()), f"output {i}: written out of bounds"
            assert bool(torch.isfinite(view).all()), (
                f"output {i}: NaN (read out of bounds: the inputs' guards hold NaN)")


def torch_inputs(kind):
    sizes, gather = bad_routing(kind)
    gen = torch.Generator().manual_seed(0)
    nan = float("nan")
    return dict(
        m_sizes=guarded(torch.from_numpy(sizes), -1)[0],
        gather=guarded(torch.from_numpy(gather), -1)[0],
        x_tokens=guarded(torch.randn(T, K, generator=gen), nan)[0],
        x=guarded(torch.randn(M, K, generator=gen), nan)[0],
        w=guarded(torch.randn(E, N, K, generator=gen), nan)[0],
        dy=guarded(torch.randn(M, N, generator=gen), nan)[0],
        weights=guarded(torch.rand(M, generator=gen), nan)[0],
    )


@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
@pytest.mark.parametrize("mode,kind", cases(FORWARD_MODES, IN_PROCESS_KINDS))
def test_triton_forward(mode, kind, tma):
    from triton_gg.kernels.forward import launch_forward
    if tma and mode == "permute_x":
        pytest.skip("a gathered X is not TMA-loaded")
    a = torch_inputs(kind)
    fuse = mode == "fuse_mul_post"
    out = Outputs((M, N), (M, N))
    config = dataclasses.replace(FWD, tma_load_x=tma, tma_load_w=tma)
    launch_forward(a["x_tokens"] if mode == "permute_x" else a["x"], a["w"], a["m_sizes"],
                   None if mode == "plain" else a["gather"], a["weights"] if fuse else None,
                   *out.views, topk=TOPK, **flags(mode), fuse_mul_post=fuse,
                   store_unweighted=fuse, config=config)
    out.check()


@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
@pytest.mark.parametrize("mode,kind", cases(BACKWARD_MODES, IN_PROCESS_KINDS))
def test_triton_dx(mode, kind, tma):
    from triton_gg.kernels.dx import launch_dx
    if tma and mode == "permute_y":
        pytest.skip("a gathered dY is not TMA-loaded")
    a = torch_inputs(kind)
    out = Outputs((M, K))
    config = dataclasses.replace(DX, tma_load_dy=tma, tma_load_w=tma)
    launch_dx(a["dy"], a["w"], a["m_sizes"], None if mode == "plain" else a["gather"],
              out.views[0], **flags(mode), config=config)
    out.check()


@pytest.mark.parametrize("tma", [False, True], ids=["ptr", "tma"])
@pytest.mark.parametrize("mode,kind", cases(BACKWARD_MODES, IN_PROCESS_KINDS))
def test_triton_dw(mode, kind, tma):
    from triton_gg.kernels.dw import launch_dw
    a = torch_inputs(kind)
    out = Outputs((E, N, K))
    config = dataclasses.replace(DW, tma_load_x=tma, tma_load_dy=tma, tma_store_dw=tma)
    launch_dw(a["x_tokens"] if mode == "permute_x" else a["x"], a["dy"], a["m_sizes"],
              None if mode == "plain" else a["gather"], out.views[0], topk=TOPK, **flags(mode),
              config=config)
    out.check()


def run_overflow_cases():
    """The triton GEMM tests above with int32-overflowing sizes (run in a child process)."""
    for mode in FORWARD_MODES:
        for tma in [False] if mode == "permute_x" else [False, True]:
            print("forward", mode, tma, flush=True)
            test_triton_forward(mode, "overflow", tma)
    for mode in BACKWARD_MODES:
        for tma in [False, True]:
            print("dw", mode, tma, flush=True)
            test_triton_dw(mode, "overflow", tma)
            if not (tma and mode == "permute_y"):
                print("dx", mode, tma, flush=True)
                test_triton_dx(mode, "overflow", tma)


def test_triton_overflow_in_child():
    import os
    import subprocess
    import sys
    script = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "import test_routing_safety; test_routing_safety.run_overflow_cases()")
    child = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)],
                           capture_output=True, text=True, timeout=600)
    last = child.stdout.strip().splitlines()[-1:] or ["(before the first case)"]
    assert child.returncode == 0, (
        f"exit {child.returncode} at case {last[0]}:\n{child.stderr[-3000:]}")


def bad_positions(kind):
    """pos [M] (the inverse of the gather indices) as bad routing leaves it: out of range,
    negative, or garbage (a repeated gather index leaves an entry of the inverse unset)."""
    pos = np.argsort(bad_routing("sum_short")[1]).astype(np.int32)
    pos[5] = {"index_over": M + 3, "index_negative": -3, "index_repeated": 3 * M}[kind]
    return guarded(torch.from_numpy(pos), -1)[0]


@pytest.mark.parametrize("sizes_kind", ["sum_over", "negative"])
@pytest.mark.parametrize("kind", INDEX_KINDS)
def test_triton_combine(kind, sizes_kind):
    from triton_gg.kernels.combine import launch_combine, launch_combine_backward
    m_sizes = guarded(torch.from_numpy(bad_routing(sizes_kind)[0]), -1)[0]
    pos, a = bad_positions(kind), torch_inputs("sum_short")
    y, d_out = a["dy"], guarded(torch.randn(T, N), float("nan"))[0]
    out = Outputs((T, N))
    launch_combine(y, a["weights"], pos, m_sizes, out.views[0], topk=TOPK)
    out.check()
    grads = Outputs((M, N), (M,))
    launch_combine_backward(y, a["weights"], pos, m_sizes, d_out, *grads.views, topk=TOPK)
    grads.check()


@pytest.mark.parametrize("kind", ["sum_over", "negative", "overflow"])
def test_triton_swiglu_passes(kind):
    from triton_gg.kernels.silu_mul import launch_silu_mul
    from triton_gg.kernels.swiglu_backward import launch_swiglu_backward
    m_sizes = guarded(torch.from_numpy(bad_routing(kind)[0]), -1)[0]
    inter = N // 2
    h = guarded(torch.randn(M, 2 * inter), float("nan"))[0]
    da = guarded(torch.randn(M, inter), float("nan"))[0]
    out = Outputs((M, inter), (M, 2 * inter))
    launch_silu_mul(h, out.views[0], m_sizes)
    launch_swiglu_backward(h, da, out.views[1], m_sizes)
    out.check()


# ------------------------------------------------------------------------ pallas_gg

@pytest.fixture(scope="module")
def _checked_pallas_accesses():
    """Record every unmasked lane of a Pallas load or store whose index is outside its ref
    (a list of "load" / "store", one per offending access, filled while the kernels run).
    Patched once for the module: each kernel variant is traced (and checked) once."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.experimental.pallas import triton as plgpu
    real_load, real_store = plgpu.load, plgpu.store
    log = []

    def check(ref, mask, what):
        indexer = ref.transforms[-1] if getattr(ref, "transforms", None) else None
        if indexer is None:
            return
        shape = ref.ref.shape if hasattr(ref, "ref") else ref.shape
        bad = jnp.zeros((), bool)
        for size, index in zip(shape, indexer.indices):
            if hasattr(index, "dtype"):  # an index array or scalar (slices are static)
                out = (index < 0) | (index >= size)
                bad = bad | jnp.any(out if mask is None else out & mask)
        jax.debug.callback(lambda b: log.append(what) if b else None, bad)

    def load(ref, *, mask=None, **kw):
        check(ref, mask, "load")
        return real_load(ref, mask=mask, **kw)

    def store(ref, val, *, mask=None, **kw):
        check(ref, mask, "store")
        return real_store(ref, val, mask=mask, **kw)

    jax.clear_caches()  # kernels traced before the patch would not be checked
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plgpu, "load", load)
        patch.setattr(plgpu, "store", store)
        yield log
    jax.clear_caches()  # nor should checked kernels outlive the module


@pytest.fixture
def access_log(_checked_pallas_accesses):
    _checked_pallas_accesses.clear()
    yield _checked_pallas_accesses


def jax_inputs(kind):
    import jax.numpy as jnp
    sizes, gather = bad_routing(kind)
    rng = np.random.default_rng(0)
    return dict(m_sizes=jnp.asarray(sizes), gather=jnp.asarray(gather),
                x_tokens=jnp.asarray(rng.standard_normal((T, K)), jnp.float32),
                x=jnp.asarray(rng.standard_normal((M, K)), jnp.float32),
                w=jnp.asarray(rng.standard_normal((E, N, K)), jnp.float32),
                dy=jnp.asarray(rng.standard_normal((M, N)), jnp.float32),
                weights=jnp.asarray(rng.random(M), jnp.float32))


def check_pallas(out, log, *, scattered: bool, kind: str):
    out = np.asarray(out)
    assert not log, f"accesses outside the arrays: {log}"
    if not (scattered and kind in INDEX_KINDS):
        # a scatter through a bad index leaves the row it missed unwritten (NaN in
        # interpret mode): wrong numbers, allowed; elsewhere every row is written
        assert np.isfinite(out).all()


@pytest.mark.parametrize("mode,kind", cases(FORWARD_MODES))
def test_pallas_forward(mode, kind, access_log):
    import pallas_gg
    a = jax_inputs(kind)
    fuse = mode == "fuse_mul_post"
    y = pallas_gg.grouped_gemm_forward(
        a["x_tokens"] if mode == "permute_x" else a["x"], a["w"], a["m_sizes"],
        None if mode == "plain" else a["gather"], TOPK, **flags(mode),
        topk_weights=a["weights"] if fuse else None, fuse_mul_post=fuse, config=FWD,
        backend="triton")
    check_pallas(y, access_log, scattered=mode == "permute_y", kind=kind)


@pytest.mark.parametrize("mode,kind", cases(BACKWARD_MODES))
def test_pallas_dx(mode, kind, access_log):
    import pallas_gg
    a = jax_inputs(kind)
    dx = pallas_gg.grouped_gemm_dX(a["dy"], a["w"], a["m_sizes"],
                                   None if mode == "plain" else a["gather"], TOPK,
                                   **flags(mode), config=DX, backend="triton")
    check_pallas(dx, access_log, scattered=mode == "permute_x", kind=kind)


@pytest.mark.parametrize("mode,kind", cases(BACKWARD_MODES))
def test_pallas_dw(mode, kind, access_log):
    import pallas_gg
    a = jax_inputs(kind)
    dw = pallas_gg.grouped_gemm_dW(a["x_tokens"] if mode == "permute_x" else a["x"], a["dy"],
                                   a["m_sizes"], None if mode == "plain" else a["gather"],
                                   TOPK, **flags(mode), config=DW, backend="triton")
    check_pallas(dw, access_log, scattered=False, kind=kind)


def test_pallas_access_check_sees_out_of_range(access_log):
    """The check above is not vacuous: a load through rows past the end is recorded, the
    same load masked to the rows in range is not."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def kernel(x_ref, o_ref, *, masked):
        rows = jnp.arange(8, dtype=jnp.int32) + 4   # rows 8..11 are past the end of x [8]
        ok = rows < 8 if masked else rows >= 0
        plgpu.store(o_ref.at[jnp.arange(8, dtype=jnp.int32)],
                    plgpu.load(x_ref.at[rows], mask=ok, other=0))

    for masked, expected in [(True, []), (False, ["load"])]:
        access_log.clear()
        call = pl.pallas_call(functools.partial(kernel, masked=masked), interpret=True,
                              out_shape=jax.ShapeDtypeStruct((8,), jnp.float32))
        jax.block_until_ready(call(jnp.ones(8, jnp.float32)))
        assert access_log == expected, (masked, access_log)
