"""pallas_gg's Mosaic GPU lowering (work in progress: the direct forward, dX and dW) in
Mosaic GPU's interpreter on CPU: the device-built tile schedule, the grouped GEMM and dW
kernels, the shared case list through the public functions with backend="mosaic", the
differentiable op on it against the Triton lowering, the race detector on one case, and the
refusals (fp32, shapes without whole TMA blocks, ragged_dot)."""

import dataclasses
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import pallas_gg  # noqa: E402
from gg_spec import DXConfig, ForwardConfig, reference, rel_error, tolerance  # noqa: E402
from gg_spec.cases import cpu_cases, make_inputs  # noqa: E402
from gg_spec import DWConfig  # noqa: E402
from pallas_gg.mosaic_lowering import (MosaicConfig, grouped_dw, grouped_matmul,  # noqa: E402
                                       tile_schedule)
from pallas_gg.mosaic_lowering.schedule import num_tiles  # noqa: E402
from pallas_gg.mosaic_lowering.matmul_ws import grouped_matmul_ws  # noqa: E402

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")


@pytest.mark.parametrize("m_sizes,block_m", [
    ([64, 0, 100, 93], 64), ([5, 0, 0, 1, 70], 64), ([0, 0, 0], 64), ([128, 128], 128),
    ([1] * 9, 4), ([0, 17, 0, 0, 3, 40], 16)])
def test_tile_schedule_covers_every_row_once(m_sizes, block_m):
    m = sum(m_sizes)
    s = tile_schedule(jnp.asarray(m_sizes, jnp.int32), m, block_m)
    expert, block, start, rows = (np.asarray(a) for a in s)
    assert expert.shape == (num_tiles(m, len(m_sizes), block_m),)
    owner = np.full(m, -1)
    for e, b, st, r in zip(expert, block, start, rows):
        if r == 0:
            continue
        assert 0 <= st and st + r <= block_m
        span = slice(b * block_m + st, b * block_m + st + r)
        assert np.all(owner[span] == -1), "a row visited twice"
        owner[span] = e
    expected = np.repeat(np.arange(len(m_sizes)), m_sizes)
    np.testing.assert_array_equal(owner, expected)


@pytest.mark.parametrize("m_sizes,m,block_m", [([64, 0, 100], 300, 64), ([5, 0], 70, 64),
                                                ([0, 0], 9, 4), ([16, 16], 32, 16)])
def test_tile_schedule_zero_tail_covers_the_rows_past_the_experts(m_sizes, m, block_m):
    """zero_tail: rows sum(m_sizes) .. m belong to the pseudo-expert E, every row once."""
    s = tile_schedule(jnp.asarray(m_sizes, jnp.int32), m, block_m, zero_tail=True)
    owner = np.full(m, -1)
    for e, b, st, r in zip(*(np.asarray(a) for a in s)):
        if r:
            span = slice(b * block_m + st, b * block_m + st + r)
            assert np.all(owner[span] == -1), "a row visited twice"
            owner[span] = e
    tail = m - sum(m_sizes)
    expected = np.concatenate([np.repeat(np.arange(len(m_sizes)), m_sizes),
                               np.full(tail, len(m_sizes))])
    np.testing.assert_array_equal(owner, expected)


SMALL = MosaicConfig(block_m=64, block_n=32, block_k=32, max_concurrent_steps=2, num_sms=4)


@pytest.mark.parametrize("num_tiles,grid_n,group", [(7, 3, 1), (7, 3, 2), (7, 3, 3),
                                                     (7, 3, 8), (1, 5, 8), (16, 1, 4)])
def test_grouped_visit_order_is_a_bijection(num_tiles, grid_n, group):
    """Every (tile, N-block) pair is visited exactly once, in groups of `group` tiles per
    N-block (the last group smaller)."""
    from pallas_gg.mosaic_lowering._common import grouped_visit
    seen = [tuple(int(v) for v in grouped_visit(i, num_tiles, grid_n, group))
            for i in range(num_tiles * grid_n)]
    assert sorted(seen) == [(t, n) for t in range(num_tiles) for n in range(grid_n)]
    if group > 1 and grid_n > 1 and num_tiles >= group:
        assert [t for t, _ in seen[:group]] == list(range(group))  # one column, `group` tiles
        assert {n for _, n in seen[:group]} == {0}


@pytest.mark.parametrize("m_sizes,n,k", [([64, 0, 100, 93], 64, 96), ([5, 0, 0, 1, 70], 32, 32),
                                         ([3], 32, 64), ([0, 0], 32, 32)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("group_m", [1, 3, 8])
def test_grouped_matmul_forward_and_dx(m_sizes, n, k, dtype, group_m):
    rng = np.random.default_rng(sum(m_sizes) + n)
    m, e = sum(m_sizes), len(m_sizes)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((e, n, k)) / np.sqrt(k)).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    sizes = np.asarray(m_sizes, np.int32)
    j = {a: jnp.asarray(v, dtype) for a, v in (("x", x), ("w", w), ("dy", dy))}
    cfg = dataclasses.replace(SMALL, group_m=group_m)
    y = grouped_matmul(j["x"], j["w"], jnp.asarray(sizes), transpose_rhs=True, config=cfg,
                       interpret=True)
    dx = grouped_matmul(j["dy"], j["w"], jnp.asarray(sizes), transpose_rhs=False,
                        config=cfg, interpret=True)
    xr, wr, dyr = (np.asarray(j[a].astype(jnp.float32)) for a in ("x", "w", "dy"))
    gather = np.arange(m, dtype=np.int32)
    ref_y = reference.forward(xr, wr, sizes, gather, 1)
    ref_dx = reference.dX(dyr, wr, sizes, gather, 1)
    assert rel_error(np.asarray(y, np.float32), ref_y) < tolerance(dtype)
    assert rel_error(np.asarray(dx, np.float32), ref_dx) < tolerance(dtype)


def _mosaic_cases():
    """The shared CPU case list in bf16/fp16 where the shapes hold whole blocks of 16 along N
    and K (the TMA engine needs whole blocks; tiny_odd's shapes are the refusal test)."""
    return [c for c in cpu_cases(("float16", "bfloat16"))
            if c.shape.n % 16 == 0 and c.shape.k % 16 == 0]


FWD = ForwardConfig(block_m=64, block_n=16, block_k=16, num_warps=4, num_stages=2)
DX = DXConfig(block_m=64, block_n=16, block_k=16, num_warps=4, num_stages=2)
DW = DWConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2)


@pytest.mark.parametrize("case", _mosaic_cases(), ids=lambda c: c.id)
def test_shared_cases_forward_and_dx(case):
    inp = make_inputs(case)
    f = case.fusion
    topk = case.topk
    j = {n: jnp.asarray(inp[n], case.dtype) for n in ("x", "w", "dy", "topk_weights")}
    m_sizes, gather = jnp.asarray(inp["m_sizes"]), jnp.asarray(inp["gather_indices"])
    y = pallas_gg.grouped_gemm_forward(
        j["x"], j["w"], m_sizes, gather, topk, permute_x=f.permute_x, permute_y=f.permute_y,
        topk_weights=j["topk_weights"], fuse_mul_post=f.fuse_mul_post, config=FWD,
        backend="mosaic")
    ref = reference.forward(inp["x"], inp["w"], inp["m_sizes"], inp["gather_indices"], topk,
                            permute_x=f.permute_x, permute_y=f.permute_y,
                            topk_weights=inp["topk_weights"], fuse_mul_post=f.fuse_mul_post)
    assert rel_error(np.asarray(y, np.float32), ref) < tolerance(case.dtype)
    if f.fuse_mul_post:
        return  # dX takes no routing weights
    dx = pallas_gg.grouped_gemm_dX(j["dy"], j["w"], m_sizes, gather, topk,
                                   permute_x=f.permute_x, permute_y=f.permute_y, config=DX,
                                   backend="mosaic")
    ref = reference.dX(inp["dy"], inp["w"], inp["m_sizes"], inp["gather_indices"], topk,
                       permute_x=f.permute_x, permute_y=f.permute_y)
    assert rel_error(np.asarray(dx, np.float32), ref) < tolerance(case.dtype)
    dw = pallas_gg.grouped_gemm_dW(j["x"], j["dy"], m_sizes, gather, topk,
                                   permute_x=f.permute_x, permute_y=f.permute_y, config=DW,
                                   backend="mosaic")
    ref = reference.dW(inp["x"], inp["dy"], inp["m_sizes"], inp["gather_indices"], topk,
                       permute_x=f.permute_x, permute_y=f.permute_y)
    assert rel_error(np.asarray(dw, np.float32), ref) < tolerance(case.dtype)
    for e in np.flatnonzero(inp["m_sizes"] == 0):
        assert np.all(np.asarray(dw[e]) == 0), f"expert {e} has no rows: dW must be 0"


def test_grouped_matmul_stores_zeros_past_the_routed_rows():
    """Rows past sum(m_sizes) (dropped slots) are zeros written by the kernel itself; the
    interpreter fills fresh buffers with NaN, so an unwritten row shows."""
    rng = np.random.default_rng(3)
    sizes = np.asarray([40, 0, 30], np.int32)
    m, n, k = 150, 64, 32
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, n, k)) / np.sqrt(k), jnp.bfloat16)
    for lhs, transpose in ((x, True), (jnp.asarray(rng.standard_normal((m, n)),
                                                   jnp.bfloat16), False)):
        out = np.asarray(grouped_matmul(lhs, w, jnp.asarray(sizes), transpose_rhs=transpose,
                                        config=SMALL, interpret=True), np.float32)
        assert np.all(out[70:] == 0)
        assert np.isfinite(out[:70]).all() and np.abs(out[:70]).sum() > 0


@pytest.mark.parametrize("m_sizes,n,k", [([20, 0, 37, 7], 64, 32), ([16, 16], 32, 32),
                                         ([0, 5], 32, 64), ([0, 0], 32, 32)])
def test_grouped_dw_ragged_reduction(m_sizes, n, k):
    """Experts whose rows start and end inside a reduction slice (neighbours' rows masked),
    experts without rows (exact zeros), a slice past the last row."""
    rng = np.random.default_rng(sum(m_sizes) + k)
    m = sum(m_sizes)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    sizes = np.asarray(m_sizes, np.int32)
    cfg = MosaicConfig(block_m=32, block_n=32, block_k=16, max_concurrent_steps=2, num_sms=4)
    dw = np.asarray(grouped_dw(x, dy, jnp.asarray(sizes), config=cfg, interpret=True),
                    np.float32)
    ref = reference.dW(np.asarray(x, np.float32), np.asarray(dy, np.float32), sizes,
                       np.arange(m, dtype=np.int32), 1)
    assert rel_error(dw, ref) < tolerance("bfloat16")
    for e in np.flatnonzero(sizes == 0):
        assert np.all(dw[e] == 0)


def test_default_config_and_triton_agreement():
    """With no config Mosaic takes its own 128 x 128 x 64 tile; it matches the float64
    reference and agrees with the Triton lowering on the same bf16 inputs."""
    rng = np.random.default_rng(3)
    m_sizes = jnp.asarray([100, 0, 156], jnp.int32)
    x = jnp.asarray(rng.standard_normal((256, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 128, 128)) / 11.3, jnp.bfloat16)
    y_m = np.asarray(pallas_gg.grouped_gemm_forward(x, w, m_sizes, None, 1, backend="mosaic"),
                     np.float32)
    y_t = pallas_gg.grouped_gemm_forward(x, w, m_sizes, None, 1, backend="triton")
    ref = reference.forward(np.asarray(x, np.float32), np.asarray(w, np.float32),
                            np.asarray(m_sizes), np.arange(256, dtype=np.int32), 1)
    assert rel_error(y_m, ref) < tolerance("bfloat16")
    assert rel_error(y_m, np.asarray(y_t, np.float32)) < 1e-2


WS = MosaicConfig(block_m=64, block_n=128, block_k=32, max_concurrent_steps=2, num_sms=3)


@pytest.mark.parametrize("m_sizes,m", [([70, 0, 100, 3], 200), ([64, 64], 128), ([0, 5], 90),
                                       ([0, 0], 16)])
def test_warp_specialized_matmul_forward_dx_and_zero_tail(m_sizes, m):
    """Two compute warpgroups + a memory warpgroup: forward and dX against float64, rows
    past sum(m_sizes) exactly zero (the interpreter's fresh buffers are NaN)."""
    rng = np.random.default_rng(m)
    sizes = np.asarray(m_sizes, np.int32)
    n, k, routed = 256, 128, sum(m_sizes)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((len(sizes), n, k)) / np.sqrt(k), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    wr = np.asarray(w, np.float32)
    g = np.arange(routed, dtype=np.int32)
    y = np.asarray(grouped_matmul_ws(x, w, jnp.asarray(sizes), transpose_rhs=True, config=WS,
                                     interpret=True), np.float32)
    dx = np.asarray(grouped_matmul_ws(dy, w, jnp.asarray(sizes), transpose_rhs=False,
                                      config=WS, interpret=True), np.float32)
    for out, ref in ((y, reference.forward(np.asarray(x, np.float32)[:routed], wr, sizes, g, 1)),
                     (dx, reference.dX(np.asarray(dy, np.float32)[:routed], wr, sizes, g, 1))):
        if routed:
            assert rel_error(out[:routed], ref) < tolerance("bfloat16")
        assert np.all(out[routed:] == 0)


def test_warp_specialized_matmul_refuses_narrow_tiles():
    x = jnp.ones((64, 64), jnp.bfloat16)
    w = jnp.ones((1, 64, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of 64"):
        grouped_matmul_ws(x, w, jnp.asarray([64], jnp.int32), transpose_rhs=True,
                          config=MosaicConfig(block_m=64, block_n=64, block_k=32))


@pytest.mark.parametrize("kernel", ["matmul", "matmul_ws", "dw"])
def test_race_detector_finds_no_race(kernel):
    """One case of each kernel under the interpreter's race detector (shared-memory
    pipeline, TMA copies; for dW also the in-place masking of boundary slices)."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    rng = np.random.default_rng(4)
    m_sizes = jnp.asarray([40, 0, 60], jnp.int32)
    x = jnp.asarray(rng.standard_normal((100, 64)), jnp.bfloat16)
    races = plgpu.InterpretGPUParams(detect_races=True)
    if kernel == "matmul":
        w = jnp.asarray(rng.standard_normal((3, 32, 64)), jnp.bfloat16)
        out = grouped_matmul(x, w, m_sizes, transpose_rhs=True, config=SMALL, interpret=races)
    elif kernel == "matmul_ws":
        w = jnp.asarray(rng.standard_normal((3, 128, 64)), jnp.bfloat16)
        out = grouped_matmul_ws(x, w, m_sizes, transpose_rhs=True, config=WS, interpret=races)
    else:
        dy = jnp.asarray(rng.standard_normal((100, 32)), jnp.bfloat16)
        cfg = MosaicConfig(block_m=32, block_n=32, block_k=16, max_concurrent_steps=2,
                           num_sms=4)
        out = grouped_dw(x, dy, m_sizes, config=cfg, interpret=races)
    jax.block_until_ready(out)
    assert not interpret_pallas_call.get_races().races_found


def test_refusals():
    x32 = jnp.ones((8, 64), jnp.float32)
    w32 = jnp.ones((2, 32, 64), jnp.float32)
    sizes = jnp.asarray([3, 5], jnp.int32)
    with pytest.raises(NotImplementedError, match="bf16 and fp16 only"):
        pallas_gg.grouped_gemm_forward(x32, w32, sizes, None, 1, backend="mosaic")
    x = x32.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match="whole TMA blocks"):
        pallas_gg.grouped_gemm_forward(x, jnp.ones((2, 40, 64), jnp.bfloat16), sizes, None, 1,
                                       backend="mosaic")
    with pytest.raises(ValueError, match="whole TMA output tiles"):
        pallas_gg.grouped_gemm_dW(x, jnp.ones((8, 40), jnp.bfloat16), sizes, None, 1,
                                  backend="mosaic")
    with pytest.raises(NotImplementedError, match="planned"):
        pallas_gg.ragged_dot(x, jnp.ones((2, 64, 32), jnp.bfloat16), sizes, backend="mosaic")


@pytest.mark.parametrize("fusion", ["permute_x", "permute_y+mul"])
def test_differentiable_op_on_mosaic_matches_triton(fusion):
    """grouped_gemm(backend="mosaic") under jit and grad: value and gradients of X, W and
    the routing weights match the float64 reference (``reference.grouped_gemm_grads``) and
    agree with the Triton lowering on the same bf16 inputs."""
    rng = np.random.default_rng(7)
    t, k_, e, n, kk = 12, 2, 4, 32, 48
    ids = np.argsort(-rng.standard_normal((t, e)), axis=1)[:, :k_]
    m_sizes, gather = pallas_gg.route(jnp.asarray(ids, jnp.int32), e)
    permute_x = fusion == "permute_x"
    x = jnp.asarray(rng.standard_normal((t if permute_x else t * k_, kk)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((e, n, kk)) / 7, jnp.bfloat16)
    weights = jnp.asarray(rng.random(t * k_), jnp.bfloat16)
    flags = dict(permute_x=permute_x, permute_y=not permute_x, fuse_mul_post=not permute_x)

    def loss(backend, cfgs, x, w, weights):
        y = pallas_gg.grouped_gemm(x, w, m_sizes, gather, k_, topk_weights=weights,
                                   backend=backend, **flags, **cfgs)
        return jnp.sum(y.astype(jnp.float32) ** 2)
    mosaic_cfgs = dict(forward_config=FWD, dx_config=DX, dw_config=DW)
    grads = {b: jax.jit(jax.value_and_grad(functools.partial(loss, b, c), argnums=(0, 1, 2)))(
        x, w, weights) for b, c in (("mosaic", mosaic_cfgs), ("triton", {}))}
    (v_m, g_m), (v_t, g_t) = grads["mosaic"], grads["triton"]
    assert abs(float(v_m) - float(v_t)) <= 2e-2 * abs(float(v_t))
    for a, b in zip(g_m, g_t):
        assert rel_error(np.asarray(a, np.float32), np.asarray(b, np.float32)) < 2e-2
    # float64: loss = sum(Y^2), so dY = 2 Y
    xr, wr, tr = (np.asarray(a, np.float32) for a in (x, w, weights))
    sizes, g = np.asarray(m_sizes), np.asarray(gather)
    y_ref = reference.forward(xr, wr, sizes, g, k_, topk_weights=tr, **flags)
    assert abs(float(v_m) - np.sum(y_ref ** 2)) <= tolerance("bfloat16") * np.sum(y_ref ** 2)
    refs = reference.grouped_gemm_grads(xr, wr, sizes, g, k_, 2 * y_ref, topk_weights=tr,
                                        **flags)
    for got, ref in zip(g_m, refs):
        if ref is None:  # no fuse_mul_post: the routing weights are not read
            assert np.all(np.asarray(got, np.float32) == 0)
        else:
            assert rel_error(np.asarray(got, np.float32), ref) < tolerance("bfloat16")


def test_dw_keeps_a_neighbours_nan_out():
    """Boundary slices hold neighbours' rows; they are selected away, not multiplied by 0,
    so a NaN (dY) or Inf (X) in one expert's rows leaves the other experts' dW finite."""
    rng = np.random.default_rng(10)
    m_sizes = jnp.asarray([5, 3, 8], jnp.int32)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    dy = rng.standard_normal((16, 32)).astype(np.float32)
    dy[5:8] = np.nan
    x[6] = np.inf
    cfg = MosaicConfig(block_m=32, block_n=32, block_k=16, max_concurrent_steps=2, num_sms=4)
    dw = np.asarray(grouped_dw(jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16),
                               m_sizes, config=cfg, interpret=True), np.float32)
    assert [bool(np.isfinite(dw[e]).all()) for e in range(3)] == [True, False, True]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["qwen3_w1", "qwen3_w2", "gptoss_w1"])
def test_gpu_mosaic_matches_triton_lowering(shape):
    """On a Hopper GPU, default Mosaic tiles: forward, dX, dW and the differentiable op's
    gradients against the float64 reference and the Triton lowering, bf16, T=256, random
    routing."""
    from gg_spec import get_shape, make_routing
    s = get_shape(shape)
    rng = np.random.default_rng(0)
    routing = make_routing("random", 256, s.num_experts, s.topk, rng)
    m = 256 * s.topk
    m_sizes = jnp.asarray(routing.m_sizes)
    gather = jnp.asarray(routing.gather_indices)
    x = jnp.asarray(rng.standard_normal((m, s.k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((s.num_experts, s.n, s.k)) / np.sqrt(s.k),
                    jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, s.n)), jnp.bfloat16)
    tol = tolerance("bfloat16")
    xr, wr, dyr = (np.asarray(a, np.float32) for a in (x, w, dy))
    sizes, g = routing.m_sizes, np.arange(m, dtype=np.int32)
    for backend_call, f64 in (
            (lambda b: pallas_gg.grouped_gemm_forward(x, w, m_sizes, gather, 1, backend=b),
             lambda: reference.forward(xr, wr, sizes, g, 1)),
            (lambda b: pallas_gg.grouped_gemm_dX(dy, w, m_sizes, gather, 1, backend=b),
             lambda: reference.dX(dyr, wr, sizes, g, 1)),
            (lambda b: pallas_gg.grouped_gemm_dW(x, dy, m_sizes, gather, 1, backend=b),
             lambda: reference.dW(xr, dyr, sizes, g, 1))):
        ours = np.asarray(backend_call("mosaic"), np.float32)
        ref = np.asarray(backend_call("triton"), np.float32)
        assert rel_error(ours, ref) < tol
        assert rel_error(ours, f64()) < tol

    def loss(b, x, w):
        y = pallas_gg.grouped_gemm(x, w, m_sizes, gather, 1, backend=b)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    g_m = jax.grad(functools.partial(loss, "mosaic"), argnums=(0, 1))(x, w)
    g_t = jax.grad(functools.partial(loss, "triton"), argnums=(0, 1))(x, w)
    refs = reference.grouped_gemm_grads(xr, wr, sizes, g, 1, dyr)
    for a, b, f64 in zip(g_m, g_t, refs):
        assert rel_error(np.asarray(a, np.float32), np.asarray(b, np.float32)) < tol
        assert rel_error(np.asarray(a, np.float32), f64) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,topk", [(513, 2), (513, 3)])   # M = 1026, 1539
def test_gpu_mosaic_rows_not_a_multiple_of_8(tokens, topk):
    """On a Hopper GPU, compiled: M = 1026 and 1539 (JAX raised "dimension 0 must have size
    smaller or a multiple of its tiling 8" before the kernels padded rows), default tiles,
    forward (plain and permute_x), dX and dW against float64."""
    from gg_spec import get_shape
    s = get_shape("qwen3_w1")
    rng = np.random.default_rng(1)
    ids = np.argsort(-rng.standard_normal((tokens, s.num_experts)), axis=1)[:, :topk]
    m_sizes, gather = pallas_gg.route(jnp.asarray(ids, jnp.int32), s.num_experts)
    sizes, g = np.asarray(m_sizes), np.asarray(gather)
    m = tokens * topk
    x = jnp.asarray(rng.standard_normal((m, s.k)), jnp.bfloat16)
    xt = jnp.asarray(rng.standard_normal((tokens, s.k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((s.num_experts, s.n, s.k)) / np.sqrt(s.k),
                    jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, s.n)), jnp.bfloat16)
    xr, xtr, wr, dyr = (np.asarray(a, np.float32) for a in (x, xt, w, dy))
    tol = tolerance("bfloat16")
    cases = [
        (pallas_gg.grouped_gemm_forward(x, w, m_sizes, gather, topk, backend="mosaic"),
         reference.forward(xr, wr, sizes, g, topk)),
        (pallas_gg.grouped_gemm_forward(xt, w, m_sizes, gather, topk, permute_x=True,
                                        backend="mosaic"),
         reference.forward(xtr, wr, sizes, g, topk, permute_x=True)),
        (pallas_gg.grouped_gemm_dX(dy, w, m_sizes, gather, topk, backend="mosaic"),
         reference.dX(dyr, wr, sizes, g, topk)),
        (pallas_gg.grouped_gemm_dW(x, dy, m_sizes, gather, topk, backend="mosaic"),
         reference.dW(xr, dyr, sizes, g, topk)),
    ]
    for ours, ref in cases:
        assert rel_error(np.asarray(ours, np.float32), ref) < tol


def test_auto_picks_mosaic_only_where_it_measured_faster(monkeypatch):
    """backend="auto": Mosaic for MOSAIC_FASTER_OPS, unfused, bf16/fp16, whole 64-tiles, no
    config, compiled on Hopper; the Triton lowering for everything else."""
    from pallas_gg import _backend
    monkeypatch.setattr(_backend, "_on_hopper", lambda: True)
    # the mechanism, with a set of winners (the measured set may be empty)
    monkeypatch.setattr(_backend, "MOSAIC_FASTER_OPS", frozenset({"forward", "dX", "dW"}))
    base = dict(dtype=jnp.bfloat16, n=1536, k=2048, fused=False, config_given=False,
                interpret=False)
    fast = ("forward", "dX", "dW")
    for op in ("forward", "dX", "dW"):
        want = "mosaic" if op in fast else "triton"
        assert _backend.pick_lowering("auto", op=op, **base) == want
        # output columns must take 128-wide tiles (N for the forward, K for dX); dW's
        # 64-wide output tiles over N and K
        narrow = {"forward": dict(n=1472), "dX": dict(k=2880), "dW": dict(k=2900)}[op]
        for change in (dict(fused=True), dict(config_given=True), dict(interpret=True),
                       dict(dtype=jnp.float32), dict(n=1000), dict(k=2900), narrow):
            assert _backend.pick_lowering("auto", op=op, **{**base, **change}) == "triton"
        assert _backend.pick_lowering("triton", op=op, **base) == "triton"
        assert _backend.pick_lowering("mosaic", op=op, **{**base, "fused": True}) == "mosaic"
    monkeypatch.setattr(_backend, "_on_hopper", lambda: False)
    assert _backend.pick_lowering("auto", op="forward", **base) == "triton"


def test_auto_keeps_the_triton_lowering_for_ops_not_measured_faster(monkeypatch):
    """With the measured set (empty today) every op of "auto" is the Triton lowering."""
    from pallas_gg import _backend
    monkeypatch.setattr(_backend, "_on_hopper", lambda: True)
    for op in ("forward", "dX", "dW"):
        want = "mosaic" if op in _backend.MOSAIC_FASTER_OPS else "triton"
        assert _backend.pick_lowering("auto", op=op, dtype=jnp.bfloat16, n=2048, k=2048,
                                      fused=False, config_given=False,
                                      interpret=False) == want


# --- any M (rows not a multiple of 8), wrong routing values, float64 references ---------

def _assert_kernels_get_whole_row_tiles(monkeypatch):
    """Wrap the Mosaic kernels' launcher: every 2-D operand of more than 8 rows must hold a
    multiple of 8 (Mosaic GPU tiles a TMA'd array's rows by 8 and raised "dimension 0 must
    have size smaller or a multiple of its tiling 8" for M = 1026 on an H200; interpret mode
    does not lower, so the CPU tests check the shapes the kernels are handed)."""
    from pallas_gg.mosaic_lowering import _common, dw as dw_mod, matmul as mm, matmul_ws
    seen = []

    def launcher(body, out_type, args, **kw):
        for a in list(args) + [out_type]:
            if len(a.shape) == 2 and a.shape[0] > 8:
                assert a.shape[0] % 8 == 0, f"a kernel got {a.shape[0]} rows"
        seen.append(tuple(a.shape for a in args))
        return _common.run_persistent(body, out_type, args, **kw)
    for mod in (mm, matmul_ws, dw_mod):
        monkeypatch.setattr(mod, "run_persistent", launcher)
    return seen


ODD_FWD = ForwardConfig(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=2)
ODD_DX = DXConfig(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=2)
ODD_DW = DWConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)


@pytest.mark.parametrize("tokens,topk", [(19, 3), (13, 1)])  # M = 57, 13: not multiples of 8
@pytest.mark.parametrize("fusion", ["plain", "permute_x", "permute_y+mul"])
def test_rows_not_a_multiple_of_8(monkeypatch, tokens, topk, fusion):
    """M % 8 != 0 runs on Mosaic (the kernels get rows padded to a multiple of 8) and the
    rows that exist match the float64 reference: forward, dX and dW."""
    seen = _assert_kernels_get_whole_row_tiles(monkeypatch)
    rng = np.random.default_rng(tokens * 10 + topk)
    e, n, kk = 3, 32, 64
    m = tokens * topk
    ids = np.argsort(-rng.standard_normal((tokens, e)), axis=1)[:, :topk]
    m_sizes, gather = pallas_gg.route(jnp.asarray(ids, jnp.int32), e)
    sizes, g = np.asarray(m_sizes), np.asarray(gather)
    px, py = fusion == "permute_x", fusion == "permute_y+mul"
    x = rng.standard_normal((tokens if px else m, kk)).astype(np.float32)
    w = (rng.standard_normal((e, n, kk)) / 8).astype(np.float32)
    dy = rng.standard_normal((m, n)).astype(np.float32)
    tw = rng.random(m).astype(np.float32)
    j = {a: jnp.asarray(v, jnp.bfloat16) for a, v in (("x", x), ("w", w), ("dy", dy),
                                                       ("tw", tw))}
    r = {a: np.asarray(v, np.float32) for a, v in j.items()}
    tol = tolerance("bfloat16")
    y = pallas_gg.grouped_gemm_forward(j["x"], j["w"], m_sizes, gather, topk, permute_x=px,
                                       permute_y=py, topk_weights=j["tw"], fuse_mul_post=py,
                                       config=ODD_FWD, backend="mosaic")
    ref = reference.forward(r["x"], r["w"], sizes, g, topk, permute_x=px, permute_y=py,
                            topk_weights=r["tw"], fuse_mul_post=py)
    assert y.shape == (m, n) and rel_error(np.asarray(y, np.float32), ref) < tol
    dx = pallas_gg.grouped_gemm_dX(j["dy"], j["w"], m_sizes, gather, topk, permute_x=px,
                                   permute_y=py, config=ODD_DX, backend="mosaic")
    ref = reference.dX(r["dy"], r["w"], sizes, g, topk, permute_x=px, permute_y=py)
    assert dx.shape == (m, kk) and rel_error(np.asarray(dx, np.float32), ref) < tol
    dw = pallas_gg.grouped_gemm_dW(j["x"], j["dy"], m_sizes, gather, topk, permute_x=px,
                                   permute_y=py, config=ODD_DW, backend="mosaic")
    ref = reference.dW(r["x"], r["dy"], sizes, g, topk, permute_x=px, permute_y=py)
    assert rel_error(np.asarray(dw, np.float32), ref) < tol
    assert len(seen) == 3


def test_rows_not_a_multiple_of_8_default_tiles_and_zero_tail(monkeypatch):
    """The kernels' own entry points with 130 rows (M = 1026 / 1539 on the GPU, scaled
    down), the default and warp-specialized tiles, 10 rows past sum(m_sizes): those are
    exact zeros, the others match float64."""
    _assert_kernels_get_whole_row_tiles(monkeypatch)
    rng = np.random.default_rng(11)
    sizes = np.asarray([50, 0, 70], np.int32)
    m, n, k = 130, 128, 64
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, n, k)) / 8, jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    xr, wr, dyr = (np.asarray(a, np.float32) for a in (x, w, dy))
    g = np.arange(120, dtype=np.int32)
    for cfg in (MosaicConfig(block_m=64, block_n=64, block_k=32, max_concurrent_steps=2,
                             num_sms=4), WS):
        y = np.asarray(grouped_matmul(x, w, jnp.asarray(sizes), transpose_rhs=True,
                                      config=cfg, interpret=True), np.float32)
        assert y.shape == (m, n) and np.all(y[120:] == 0)
        assert rel_error(y[:120], reference.forward(xr[:120], wr, sizes, g, 1)) < 2e-2
    dwo = np.asarray(grouped_dw(x, dy, jnp.asarray(sizes), config=MosaicConfig(
        block_m=64, block_n=32, block_k=16, max_concurrent_steps=2, num_sms=4),
        interpret=True), np.float32)
    assert rel_error(dwo, reference.dW(xr[:120], dyr[:120], sizes, g, 1)) < 2e-2


@pytest.mark.parametrize("m_sizes", [
    [5, -3, 9, 0], [-7, -7, 30, 2], [100, 100, 100, 100], [2**31 - 1, 2**31 - 1, 5, 1],
    [0, 0, 0, 0], [3, 3, 3, 3], [-2**31, 2**31 - 1, 2**31 - 1, 40]])
def test_expert_row_ranges_stay_inside_the_rows(m_sizes):
    """Any int32 m_sizes (negative, summing past M or short, int32-overflowing sums): every
    expert's rows lie in [0, M], in order, and valid sizes give the plain offsets."""
    from pallas_gg.mosaic_lowering.schedule import expert_row_ranges
    m = 37
    starts, ends = (np.asarray(a) for a in expert_row_ranges(
        jnp.asarray(m_sizes, jnp.int32), m))
    assert np.all(0 <= starts) and np.all(starts <= ends) and np.all(ends <= m)
    assert np.all(starts[1:] == ends[:-1]) and starts[0] == 0
    clipped = np.clip(np.asarray(m_sizes, np.int64), 0, None)
    np.testing.assert_array_equal(ends, np.minimum(np.cumsum(clipped), m))
    s = tile_schedule(jnp.asarray(m_sizes, jnp.int32), m, 8, zero_tail=True)
    expert, block, start, rows = (np.asarray(a) for a in s)
    assert np.all(start >= 0) and np.all(start + rows <= 8) and np.all(rows >= 0)
    assert np.all(block * 8 + start + rows <= m)
    assert rows.sum() == m  # every row once: the experts' and the zero tail's


BAD_ROUTING = {
    "sum_past_m": ([30, 25, 20], None),
    "sum_short": ([4, 0, 3], None),
    "negative": ([-9, 40, 12], None),
    "gather_out_of_range": (None, lambda m: np.arange(m) * 7 - 5),
    "gather_repeated": (None, lambda m: np.zeros(m)),
}


@pytest.mark.parametrize("bad", list(BAD_ROUTING))
@pytest.mark.parametrize("fusion", ["permute_x", "permute_y+mul"])
def test_wrong_routing_values_stay_inside_the_arrays(bad, fusion):
    """Unchecked routing values (under jit; value checks are opt-in): m_sizes summing past
    M or short, negative sizes, gather indices out of range or repeated. Mosaic GPU's
    interpreter raises on any shared-memory or scalar access outside an allocation (and
    models TMA's bounds), so running at all is the memory-safety check; finite inputs give
    finite outputs."""
    sizes_bad, gather_bad = BAD_ROUTING[bad]
    rng = np.random.default_rng(5)
    t, topk, e, n, kk = 11, 3, 3, 32, 32
    m = t * topk
    m_sizes = np.asarray(sizes_bad if sizes_bad else [10, 0, m - 10], np.int32)
    gather = (gather_bad(m) if gather_bad else rng.permutation(m)).astype(np.int32)
    px = fusion == "permute_x"
    x = jnp.asarray(rng.standard_normal((t if px else m, kk)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((e, n, kk)) / 6, jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    tw = jnp.asarray(rng.random(m), jnp.bfloat16)
    flags = dict(permute_x=px, permute_y=not px)

    @jax.jit
    def run(x, w, dy, tw, m_sizes, gather):
        y = pallas_gg.grouped_gemm_forward(x, w, m_sizes, gather, topk, topk_weights=tw,
                                           fuse_mul_post=not px, config=ODD_FWD,
                                           backend="mosaic", **flags)
        dx = pallas_gg.grouped_gemm_dX(dy, w, m_sizes, gather, topk, config=ODD_DX,
                                       backend="mosaic", **flags)
        dw = pallas_gg.grouped_gemm_dW(x, dy, m_sizes, gather, topk, config=ODD_DW,
                                       backend="mosaic", **flags)
        return y, dx, dw
    outs = run(x, w, dy, tw, jnp.asarray(m_sizes), jnp.asarray(gather))
    for out in outs:
        assert np.isfinite(np.asarray(out, np.float32)).all()
