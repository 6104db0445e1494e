"""pallas_gg: the Pallas grouped GEMMs against the float64 reference of gg_spec.

On CPU every kernel runs in Pallas interpret mode (small shapes from gg_spec.cases); the
`gpu` tests run the real model shapes in bf16 on a GPU (`pytest -m gpu`).

Compilation dominates the CPU run time: each distinct (shape, config, fusion) compiles one
interpreted kernel. The direct calls and the differentiable op share the kernels' jit caches
(autotune on CPU resolves to the default config), so the matrix runs every case once per op.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import gg_spec
import pallas_gg
from gg_spec import DWConfig, DXConfig, ForwardConfig, reference, rel_error, tolerance
from gg_spec import tuning_cache
from gg_spec.cases import (Case, Fusion, cpu_cases, edge_cases, fusions_for, gpu_cases,
                           make_inputs)
from gg_spec.presets import get_shape
from pallas_gg import schedule, triton_lowering, tuning

# The deprecation warning of Pallas' Triton lowering is silenced by pallas_gg for its users;
# pytest re-enables DeprecationWarnings per test, hence this filter (and a subprocess test).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

# ---------------------------------------------------------------------------- helpers

# A small non-default config for every op (and group_m > 1 to exercise the swizzle).
SMALL_CONFIGS = {
    "forward": ForwardConfig(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=2,
                             group_m=2),
    "dX": DXConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2, group_m=3),
    "dW": DWConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2),
}


@pytest.fixture(autouse=True)
def _private_tuning_cache(tmp_path, monkeypatch):
    """Every test sees an empty tuning cache of its own."""
    monkeypatch.setenv("GG_CACHE_DIR", str(tmp_path / "gg_cache"))


class Inputs:
    """A case's inputs as jax arrays in the case dtype, next to the float32 numpy originals."""

    def __init__(self, case: Case):
        self.case = case
        self.np = make_inputs(case)
        dtype = jnp.dtype(case.dtype)
        self.x = jnp.asarray(self.np["x"], dtype)
        self.w = jnp.asarray(self.np["w"], dtype)
        self.dy = jnp.asarray(self.np["dy"], dtype)
        self.topk_weights = jnp.asarray(self.np["topk_weights"], dtype)
        self.m_sizes = jnp.asarray(self.np["m_sizes"])
        self.gather = jnp.asarray(self.np["gather_indices"])

    @property
    def flags(self) -> dict:
        f = self.case.fusion
        return dict(permute_x=f.permute_x, permute_y=f.permute_y)

    @property
    def routing(self):
        return self.np["m_sizes"], self.np["gather_indices"], self.case.topk

    def ref_forward(self):
        f = self.case.fusion
        return reference.forward(self.np["x"], self.np["w"], *self.routing, **self.flags,
                                 topk_weights=self.np["topk_weights"],
                                 fuse_mul_post=f.fuse_mul_post)

    def ref_dX(self):
        return reference.dX(self.np["dy"], self.np["w"], *self.routing, **self.flags)

    def ref_dW(self):
        return reference.dW(self.np["x"], self.np["dy"], *self.routing, **self.flags)

    def ref_grads(self):
        f = self.case.fusion
        return reference.grouped_gemm_grads(
            self.np["x"], self.np["w"], *self.routing, self.np["dy"], **self.flags,
            topk_weights=self.np["topk_weights"], fuse_mul_post=f.fuse_mul_post)


def assert_close(out, ref, dtype: str, what: str):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != reference {ref.shape}"
    assert np.all(np.isfinite(out)), f"{what}: non-finite values (unwritten rows?)"
    err = rel_error(out, ref)
    assert err <= tolerance(dtype), f"{what}: rel error {err:.3g} > {tolerance(dtype)}"


def run_direct(inp: Inputs, configs=None):
    configs = configs or {}
    f = inp.case.fusion
    y = pallas_gg.grouped_gemm_forward(
        inp.x, inp.w, inp.m_sizes, inp.gather, inp.case.topk, **inp.flags,
        topk_weights=inp.topk_weights, fuse_mul_post=f.fuse_mul_post,
        config=configs.get("forward"))
    dx = pallas_gg.grouped_gemm_dX(inp.dy, inp.w, inp.m_sizes, inp.gather, inp.case.topk,
                                   **inp.flags, config=configs.get("dX"))
    dw = pallas_gg.grouped_gemm_dW(inp.x, inp.dy, inp.m_sizes, inp.gather, inp.case.topk,
                                   **inp.flags, config=configs.get("dW"))
    return y, dx, dw


def check_direct(inp: Inputs, configs=None):
    y, dx, dw = run_direct(inp, configs)
    dtype = inp.case.dtype
    for out, dt in ((y, dtype), (dx, dtype), (dw, dtype)):
        assert out.dtype == jnp.dtype(dt)
    assert_close(y, inp.ref_forward(), dtype, "forward")
    assert_close(dx, inp.ref_dX(), dtype, "dX")
    assert_close(dw, inp.ref_dW(), dtype, "dW")
    return dw


def run_grads(inp: Inputs, *, configs=None, autotune=False, jit=False):
    """(Y, dX, dW, d_topk_weights) of pallas_gg.grouped_gemm through jax.vjp."""
    configs = configs or {}
    f = inp.case.fusion

    def op(x, w, topk_weights):
        return pallas_gg.grouped_gemm(
            x, w, inp.m_sizes, inp.gather, inp.case.topk, **inp.flags,
            topk_weights=topk_weights, fuse_mul_post=f.fuse_mul_post,
            forward_config=configs.get("forward"), dx_config=configs.get("dX"),
            dw_config=configs.get("dW"), autotune=autotune)

    def vjp(x, w, topk_weights, dy):
        y, pullback = jax.vjp(op, x, w, topk_weights)
        return (y, *pullback(dy))

    if jit:
        vjp = jax.jit(vjp)
    return vjp(inp.x, inp.w, inp.topk_weights, inp.dy)


def check_grads_vs_reference(inp: Inputs, **kwargs):
    y, dx, dw, d_weights = run_grads(inp, **kwargs)
    ref_dx, ref_dw, ref_d_weights = inp.ref_grads()
    dtype = inp.case.dtype
    assert_close(y, inp.ref_forward(), dtype, "grouped_gemm Y")
    assert dx.shape == inp.x.shape and dx.dtype == inp.x.dtype
    assert dw.shape == inp.w.shape and dw.dtype == inp.w.dtype
    assert_close(dx, ref_dx, dtype, "grad X")
    assert_close(dw, ref_dw, dtype, "grad W")
    if inp.case.fusion.fuse_mul_post:
        assert d_weights.dtype == inp.topk_weights.dtype
        assert_close(d_weights, ref_d_weights, dtype, "grad topk_weights")
    else:
        np.testing.assert_array_equal(np.asarray(d_weights, np.float32), 0.0)


# ---------------------------------------------------------------------------- the matrix

MATRIX = cpu_cases(("float32", "bfloat16"))
# fp16, the third input dtype, on the odd-sized preset (one case per fusion; deduplicated:
# cpu_cases of 16-bit dtypes alone lists the odd-preset cases twice).
FP16_CASES = list({c.id: c for c in cpu_cases(("float16",))
                   if c.shape.name.startswith("tiny_odd")}.values())
EDGES = edge_cases()


def _ids(case):
    return case.id


@pytest.mark.parametrize("case", MATRIX + FP16_CASES, ids=_ids)
def test_direct_default_config(case):
    """forward, dX and dW called directly, default configs, vs the float64 reference."""
    check_direct(Inputs(case))


@pytest.mark.parametrize("case", MATRIX, ids=_ids)
def test_autograd_autotune(case):
    """grouped_gemm under jax.vjp with autotune=True (on CPU: cached or default configs)."""
    check_grads_vs_reference(Inputs(case), autotune=True)


# One case per (GEMM, fusion, top-k) in fp32, and per (GEMM, fusion) in bf16, plus the odd
# and many-expert presets: every fusion and both GEMMs with a small manual config.
MANUAL = [c for c in MATRIX if c.shape.name.startswith("tiny_w") and c.dtype == "float32"]
MANUAL += [c for c in MATRIX if c.shape.name.startswith("tiny_w") and c.dtype == "bfloat16"
           and c.topk == 2]
MANUAL += [c for c in MATRIX if c.shape.name.startswith(("tiny_odd", "tiny_many"))
           and c.dtype == "float32" and c.fusion.name in ("permute_x", "permute_y+mul")]


@pytest.mark.parametrize("case", MANUAL, ids=_ids)
def test_direct_and_autograd_manual_config(case):
    inp = Inputs(case)
    check_direct(inp, SMALL_CONFIGS)
    check_grads_vs_reference(inp, configs=SMALL_CONFIGS)


@pytest.mark.parametrize("case", EDGES, ids=_ids)
def test_edge_cases(case):
    """No tokens on some experts, all on one, one token, zero tokens, top-k 1."""
    inp = Inputs(case)
    dw = check_direct(inp)
    empty = np.flatnonzero(inp.np["m_sizes"] == 0)
    assert np.all(np.asarray(dw)[empty] == 0.0), "dW of an empty expert must be exactly zero"
    check_grads_vs_reference(inp)


# ---------------------------------------------------------------------------- unwritten rows

def test_empty_experts_exact_zero_and_all_rows_written():
    case = Case(get_shape("tiny_odd_w2"), 9, "float32", "empty_experts", Fusion(permute_y=True))
    inp = Inputs(case)
    assert np.any(inp.np["m_sizes"] == 0)
    y, dx, dw = run_direct(inp)
    for out in (y, dx, dw):
        assert np.all(np.isfinite(np.asarray(out)))
    empty = inp.np["m_sizes"] == 0
    np.testing.assert_array_equal(np.asarray(dw)[empty], 0.0)
    assert np.all(np.any(np.asarray(dw)[~empty] != 0.0, axis=(1, 2)))


def test_a_kernel_leaving_rows_unwritten_is_caught(monkeypatch):
    """Interpret-mode outputs start as NaN: a schedule one tile short leaves rows unwritten,
    and the checks of this file (finite values, rel_error) notice."""
    case = Case(get_shape("tiny_w1"), 24, "float32", "random", Fusion())
    inp = Inputs(case)
    short = lambda rows, experts, bm: schedule.cdiv(rows, bm) - 1  # noqa: E731
    monkeypatch.setattr(schedule, "max_row_tiles", short)
    config = ForwardConfig(block_m=16, block_n=64, block_k=64, num_stages=1)  # fresh trace
    try:
        y = triton_lowering.forward(inp.x, inp.w, inp.m_sizes, None, None, topk=2,
                                    num_rows=inp.x.shape[0], permute_x=False, permute_y=False,
                                    fuse_mul_post=False, config=config, interpret=True)
    finally:  # the broken schedule must not stay in the kernel's jit cache
        forward_module = __import__("pallas_gg.triton_lowering.forward", fromlist=["_"])
        forward_module._forward.clear_cache()
    assert not np.all(np.isfinite(np.asarray(y)))
    assert rel_error(np.asarray(y), inp.ref_forward()) == float("inf")


# ---------------------------------------------------------------------------- jit and grads

JIT_CASES = [c for c in MATRIX if c.shape.name.startswith("tiny_odd") and c.dtype == "float32"]
# Outside the seed's rules but allowed by the contract: the first GEMM with routing weights.
JIT_CASES.append(Case(get_shape("tiny_odd_w1"), 13, "float32", "random",
                      Fusion(permute_x=True, fuse_mul_post=True)))


@pytest.mark.parametrize("case", JIT_CASES, ids=_ids)
def test_grouped_gemm_under_jit(case):
    check_grads_vs_reference(Inputs(case), jit=True)


def test_direct_ops_under_jit():
    case = Case(get_shape("tiny_odd_w2"), 13, "float32", "empty_experts",
                Fusion(permute_y=True, fuse_mul_post=True))
    inp = Inputs(case)

    @jax.jit
    def all_three(x, w, dy, m_sizes, gather, topk_weights):
        y = pallas_gg.grouped_gemm_forward(x, w, m_sizes, gather, 3, permute_y=True,
                                           topk_weights=topk_weights, fuse_mul_post=True)
        dx = pallas_gg.grouped_gemm_dX(dy, w, m_sizes, gather, 3, permute_y=True)
        dw = pallas_gg.grouped_gemm_dW(x, dy, m_sizes, gather, 3, permute_y=True)
        return y, dx, dw

    y, dx, dw = all_three(inp.x, inp.w, inp.dy, inp.m_sizes, inp.gather, inp.topk_weights)
    assert_close(y, inp.ref_forward(), "float32", "forward")
    assert_close(dx, inp.ref_dX(), "float32", "dX")
    assert_close(dw, inp.ref_dW(), "float32", "dW")


def test_jax_grad_of_a_loss_with_routing_inside_jit():
    """An MoE-style loss: route on device, both GEMMs, jax.grad w.r.t. everything float."""
    rng = np.random.default_rng(0)
    tokens, hidden, inter, experts, topk = 10, 24, 20, 4, 2
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), jnp.float32)
    w1 = jnp.asarray(rng.standard_normal((experts, 2 * inter, hidden)) / 5, jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((experts, hidden, inter)) / 5, jnp.float32)
    ids = jnp.asarray(gg_spec.make_topk_ids("random", tokens, experts, topk, rng))
    weights = jnp.asarray(rng.random(tokens * topk), jnp.float32)

    def loss(x, w1, w2, weights, use_pallas):
        m_sizes, gather = pallas_gg.route(ids, experts)
        if use_pallas:
            h = pallas_gg.grouped_gemm(x, w1, m_sizes, gather, topk, permute_x=True)
            h = jax.nn.silu(h[:, :inter]) * h[:, inter:]
            y = pallas_gg.grouped_gemm(h, w2, m_sizes, gather, topk, permute_y=True,
                                       topk_weights=weights, fuse_mul_post=True)
        else:  # the same MLP with jax.lax.ragged_dot on explicitly permuted rows
            xs = x[gather // topk]
            h = jax.lax.ragged_dot(xs, jnp.swapaxes(w1, 1, 2), m_sizes,
                                   precision=jax.lax.Precision.HIGHEST)
            h = jax.nn.silu(h[:, :inter]) * h[:, inter:]
            ye = jax.lax.ragged_dot(h, jnp.swapaxes(w2, 1, 2), m_sizes,
                                    precision=jax.lax.Precision.HIGHEST)
            ye = ye * weights[gather][:, None]
            y = jnp.zeros_like(ye).at[gather].set(ye)
        out = y.reshape(tokens, topk, hidden).sum(axis=1)
        return jnp.sum(jnp.sin(out))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
    ours, theirs = grad(x, w1, w2, weights, True), grad(x, w1, w2, weights, False)
    for a, b in zip(ours, theirs):
        assert rel_error(np.asarray(a), np.asarray(b, np.float64)) < 1e-5


def test_check_grads_fp32():
    """jax.test_util.check_grads (reverse mode, finite differences) on a tiny fp32 case."""
    case = Case(get_shape("tiny_odd_w2"), 5, "float32", "random",
                Fusion(permute_y=True, fuse_mul_post=True))
    inp = Inputs(case)

    def op(x, w, topk_weights):
        return pallas_gg.grouped_gemm(x, w, inp.m_sizes, inp.gather, 3, permute_y=True,
                                      topk_weights=topk_weights, fuse_mul_post=True)

    check_grads(op, (inp.x, inp.w, inp.topk_weights), order=1, modes=("rev",),
                              atol=2e-2, rtol=2e-2, eps=1e-2)


def test_check_grads_fp32_permute_x():
    case = Case(get_shape("tiny_odd_w1"), 5, "float32", "random", Fusion(permute_x=True))
    inp = Inputs(case)

    def op(x, w):
        return pallas_gg.grouped_gemm(x, w, inp.m_sizes, inp.gather, 3, permute_x=True)

    check_grads(op, (inp.x, inp.w), order=1, modes=("rev",), atol=2e-2,
                              rtol=2e-2, eps=1e-2)


def test_integer_arguments_get_no_gradient():
    case = Case(get_shape("tiny_w2"), 6, "float32", "random", Fusion(permute_y=True))
    inp = Inputs(case)
    grads = jax.grad(lambda x, w, m, g: pallas_gg.grouped_gemm(
        x, w, m, g, 2, permute_y=True).sum(), argnums=(0, 1, 2, 3), allow_int=True)(
        inp.x, inp.w, inp.m_sizes, inp.gather)
    assert grads[2].dtype == jax.dtypes.float0 and grads[3].dtype == jax.dtypes.float0


# ---------------------------------------------------------------------------- ragged_dot

def _ragged_problem(rng, dtype, group_sizes, k=40, n=38):
    m = int(np.sum(group_sizes)) + 3  # three trailing rows past sum(group_sizes)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(group_sizes), k, n)) / np.sqrt(k), dtype)
    return lhs, rhs, jnp.asarray(group_sizes, jnp.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ragged_dot_drop_in_values_and_grads(dtype, rng):
    lhs, rhs, gs = _ragged_problem(rng, dtype, [7, 0, 12, 1])
    d_out = jnp.asarray(rng.standard_normal((lhs.shape[0], rhs.shape[2])), dtype)
    precision = jax.lax.Precision.HIGHEST

    def vjp(fn):
        out, pullback = jax.vjp(lambda a, b: fn(a, b, gs), lhs, rhs)
        return (out, *pullback(d_out.astype(out.dtype)))

    ours = jax.jit(lambda: vjp(pallas_gg.ragged_dot))()
    theirs = vjp(lambda a, b, g: jax.lax.ragged_dot(
        a.astype(jnp.float32), b.astype(jnp.float32), g, precision=precision))
    # The reference runs in fp32 on the same (rounded) inputs.
    for a, b, what in zip(ours, theirs, ("out", "d_lhs", "d_rhs")):
        assert a.dtype == jnp.dtype(dtype), what
        assert_close(a, np.asarray(b, np.float64), dtype, f"ragged_dot {what}")
    np.testing.assert_array_equal(np.asarray(ours[0][-3:], np.float32), 0.0)


@pytest.fixture
def value_checks_on():
    """The opt-in value checks (off by default: each is a host sync)."""
    with gg_spec.value_checks(True):
        yield


def test_ragged_dot_preferred_element_type_and_errors(rng, value_checks_on):
    lhs, rhs, gs = _ragged_problem(rng, "bfloat16", [5, 6])
    out = pallas_gg.ragged_dot(lhs, rhs, gs, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    ref = jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), gs,
                             precision=jax.lax.Precision.HIGHEST)
    assert rel_error(np.asarray(out), np.asarray(ref)) < 1e-5
    with pytest.raises(ValueError, match="rhs"):
        pallas_gg.ragged_dot(lhs, rhs[0], gs)
    with pytest.raises(ValueError, match="K="):
        pallas_gg.ragged_dot(lhs[:, :-1], rhs, gs)
    with pytest.raises(ValueError, match="sum"):
        pallas_gg.ragged_dot(lhs, rhs, gs + 100)
    with pytest.raises(NotImplementedError, match="group_offset"):
        pallas_gg.ragged_dot(lhs, rhs, gs, group_offset=jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("fusion", [Fusion(), Fusion(permute_x=True)], ids=lambda f: f.name)
def test_unfused_path_agrees_with_lax_ragged_dot(fusion):
    case = Case(get_shape("tiny_odd_w1"), 13, "float32", "empty_experts", fusion)
    inp = Inputs(case)
    y = pallas_gg.grouped_gemm_forward(inp.x, inp.w, inp.m_sizes, inp.gather, 3,
                                       **inp.flags)
    xs = inp.x[inp.gather // 3] if fusion.permute_x else inp.x
    ref = jax.lax.ragged_dot(xs, jnp.swapaxes(inp.w, 1, 2), inp.m_sizes,
                             precision=jax.lax.Precision.HIGHEST)
    assert rel_error(np.asarray(y), np.asarray(ref)) < 1e-5


# ---------------------------------------------------------------------------- route

@pytest.mark.parametrize("kind", gg_spec.ROUTING_KINDS)
def test_route_matches_gg_spec(kind, rng):
    ids = gg_spec.make_topk_ids(kind, 17, 6, 3, rng)
    m_sizes, gather = pallas_gg.route(jnp.asarray(ids), 6)
    ref_m, ref_g = gg_spec.route(ids, 6)
    assert m_sizes.dtype == jnp.int32 and gather.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(m_sizes), ref_m)
    np.testing.assert_array_equal(np.asarray(gather), ref_g)
    jitted = jax.jit(pallas_gg.route, static_argnums=1)(jnp.asarray(ids), 6)
    np.testing.assert_array_equal(np.asarray(jitted[1]), ref_g)


def test_route_errors(value_checks_on):
    with pytest.raises(ValueError, match="2-D"):
        pallas_gg.route(jnp.zeros((4,), jnp.int32), 4)
    with pytest.raises(ValueError, match="num_experts"):
        pallas_gg.route(jnp.zeros((4, 2), jnp.int32), 0)
    with pytest.raises(ValueError, match="range"):
        pallas_gg.route(jnp.full((4, 2), 7, jnp.int32), 4)


# ---------------------------------------------------------------------------- validation

@pytest.fixture
def second_gemm():
    return Inputs(Case(get_shape("tiny_w2"), 8, "float32", "random", Fusion()))


def test_wrong_rank_and_shapes(second_gemm):
    p = second_gemm
    with pytest.raises(ValueError, match="W must be 3-D"):
        pallas_gg.grouped_gemm_forward(p.x, p.w[0], p.m_sizes, p.gather, 2)
    with pytest.raises(ValueError, match="X must be 2-D"):
        pallas_gg.grouped_gemm_forward(p.x[None], p.w, p.m_sizes, p.gather, 2)
    with pytest.raises(ValueError, match="K="):
        pallas_gg.grouped_gemm_forward(p.x[:, :-1], p.w, p.m_sizes, p.gather, 2)
    with pytest.raises(ValueError, match="dY has N="):
        pallas_gg.grouped_gemm_dX(p.dy[:, :-1], p.w, p.m_sizes, p.gather, 2)
    with pytest.raises(ValueError, match="X has .* rows"):
        pallas_gg.grouped_gemm_dW(p.x[:-1], p.dy, p.m_sizes, p.gather, 2)
    with pytest.raises(ValueError, match="m_sizes has"):
        pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes[:-1], p.gather, 2)
    with pytest.raises(ValueError, match="dtype"):
        pallas_gg.grouped_gemm_forward(p.x, p.w.astype(jnp.bfloat16), p.m_sizes, p.gather, 2)
    with pytest.raises(ValueError, match="topk_weights is required"):
        pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, p.gather, 2, fuse_mul_post=True)
    with pytest.raises(ValueError, match="gather_indices is required"):
        pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, None, 2, permute_y=True)
    with pytest.raises(ValueError, match="topk"):
        pallas_gg.grouped_gemm(p.x, p.w, p.m_sizes, p.gather, 0)
    with pytest.raises(ValueError, match="T\\*topk"):  # permute_x: X must hold M/topk tokens
        pallas_gg.grouped_gemm(p.x[:5], p.w, p.m_sizes, p.gather, 2, permute_x=True)


def test_routing_values(second_gemm, value_checks_on):
    p = second_gemm
    bad_sizes = p.m_sizes.at[0].add(1)
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)"):
        pallas_gg.grouped_gemm_forward(p.x, p.w, bad_sizes, p.gather, 2)
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)"):
        pallas_gg.grouped_gemm(p.x, p.w, bad_sizes, p.gather, 2)
    bad_gather = p.gather.at[3].set(p.x.shape[0])
    with pytest.raises(ValueError, match="gather_indices must lie"):
        pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, bad_gather, 2, permute_y=True)
    with pytest.raises(ValueError, match="gather_indices must lie"):
        pallas_gg.grouped_gemm_dW(p.x, p.dy, p.m_sizes, bad_gather.at[0].set(-1), 2,
                                  permute_y=True)
    previous = gg_spec.set_value_checks(False)
    try:  # with the checks off nothing is read back; the call goes through
        pallas_gg.grouped_gemm_forward(p.x, p.w, bad_sizes, p.gather, 2)
    finally:
        gg_spec.set_value_checks(previous)


def test_routing_errors_found_before_any_launch(second_gemm, value_checks_on):
    """As triton_gg: a topk that disagrees with len(gather_indices) under permute_x (direct
    ops too), a repeated gather index, no experts but routed rows; numpy routing closed
    over by a jitted function; and tune() refuses bad routing before timing anything."""
    p = second_gemm
    m, k = p.x.shape
    x_tokens = p.x[: m // 2]
    for call in (lambda: pallas_gg.grouped_gemm_forward(x_tokens, p.w, p.m_sizes, p.gather, 4,
                                                        permute_x=True),
                 lambda: pallas_gg.grouped_gemm_dW(x_tokens, p.dy, p.m_sizes, p.gather, 4,
                                                   permute_x=True)):
        with pytest.raises(ValueError, match=rf"T\*topk={m * 2} routed rows, but "
                                             rf"gather_indices has M={m}"):
            call()
    twice = p.gather.at[1].set(p.gather[0])
    with pytest.raises(ValueError, match=rf"permutation of \[0, {m}\).*only {m - 1} of its {m} entries"):
        pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, twice, 2, permute_y=True)
    with pytest.raises(ValueError, match="permutation"):
        pallas_gg.grouped_gemm(p.x, p.w, p.m_sizes, twice, 2, permute_y=True)
    # without a fusion the gather indices are not read, so not checked (as in triton_gg)
    unused = jnp.zeros_like(p.gather)
    pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, unused, 2)
    pallas_gg.grouped_gemm_dW(p.x, p.dy, p.m_sizes, unused, 2)
    with pytest.raises(ValueError, match=rf"sum\(m_sizes\)=0 must equal the M={m}"):
        pallas_gg.grouped_gemm_dW(p.x, p.dy, p.m_sizes[:0], None, 2)
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)=0"):
        pallas_gg.grouped_gemm_forward(p.x, p.w[:0], p.m_sizes[:0], None, 2)
    bad_sizes = np.asarray(p.m_sizes).copy()
    bad_sizes[0] += 1
    gather = np.asarray(p.gather)
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)"):
        jax.jit(lambda x: pallas_gg.grouped_gemm_forward(x, p.w, bad_sizes, gather, 2))(p.x)
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)"):
        tuning.tune(p.x, p.w, bad_sizes, gather, 2)


def test_empty_reductions_give_zeros(second_gemm):
    """K = 0 (forward) and N = 0 (dX) are sums over nothing: zeros of the right shape, as
    jax.lax.ragged_dot gives, never a launch that fails inside the kernel."""
    p = second_gemm
    m, k = p.x.shape
    n = p.w.shape[1]
    y = pallas_gg.grouped_gemm_forward(p.x[:, :0], p.w[:, :, :0], p.m_sizes, p.gather, 2)
    assert y.shape == (m, n) and not jnp.any(y)
    dx = pallas_gg.grouped_gemm_dX(p.dy[:, :0], p.w[:, :0], p.m_sizes, p.gather, 2)
    assert dx.shape == (m, k) and not jnp.any(dx)
    y = pallas_gg.grouped_gemm(p.x[:, :0], p.w[:, :, :0], p.m_sizes, p.gather, 2)
    assert y.shape == (m, n) and not jnp.any(y)
    lhs, rhs = p.x[:, :0], jnp.zeros((p.w.shape[0], 0, n), p.x.dtype)
    np.testing.assert_array_equal(pallas_gg.ragged_dot(lhs, rhs, p.m_sizes),
                                  jax.lax.ragged_dot(lhs, rhs, p.m_sizes))


def test_configs_that_conflict_with_the_fusions(second_gemm):
    p = second_gemm
    first = Inputs(Case(get_shape("tiny_w1"), 8, "float32", "random", Fusion(permute_x=True)))
    with pytest.raises(ValueError, match="tma_load_x=True conflicts with permute_x"):
        pallas_gg.grouped_gemm_forward(first.x, first.w, first.m_sizes, first.gather, 2,
                                       permute_x=True, config=ForwardConfig(tma_load_x=True))
    with pytest.raises(ValueError, match="tma_store_y=True conflicts with permute_y"):
        pallas_gg.grouped_gemm(p.x, p.w, p.m_sizes, p.gather, 2, permute_y=True,
                               forward_config=ForwardConfig(tma_store_y=True))
    with pytest.raises(ValueError, match="tma_load_dy=True conflicts with permute_y"):
        pallas_gg.grouped_gemm_dW(p.x, p.dy, p.m_sizes, p.gather, 2, permute_y=True,
                                  config=DWConfig(tma_load_dy=True))
    with pytest.raises(ValueError, match="must be a DXConfig"):
        pallas_gg.grouped_gemm_dX(p.dy, p.w, p.m_sizes, p.gather, 2, config=DWConfig())
    with pytest.raises(ValueError, match="block_m=48"):
        pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, p.gather, 2,
                                       config=ForwardConfig(block_m=48))
    with pytest.raises(ValueError, match="cannot both be set"):
        pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, p.gather, 2, permute_x=True,
                                       permute_y=True)
    # A TMA switch that does not conflict is accepted (and ignored by the Triton lowering).
    y = pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, p.gather, 2,
                                       config=ForwardConfig(tma_load_w=True))
    assert_close(y, p.ref_forward(), "float32", "forward with tma_load_w")


def test_backends(second_gemm):
    p = second_gemm
    calls = [
        lambda b: pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, p.gather, 2, backend=b),
        lambda b: pallas_gg.grouped_gemm_dX(p.dy, p.w, p.m_sizes, p.gather, 2, backend=b),
        lambda b: pallas_gg.grouped_gemm_dW(p.x, p.dy, p.m_sizes, p.gather, 2, backend=b),
        lambda b: pallas_gg.grouped_gemm(p.x, p.w, p.m_sizes, p.gather, 2, backend=b),
        lambda b: pallas_gg.ragged_dot(p.x, jnp.swapaxes(p.w, 1, 2), p.m_sizes, backend=b),
        lambda b: pallas_gg.tune(p.x, p.w, p.m_sizes, p.gather, 2, backend=b),
    ]
    for call in calls:
        # the GEMMs exist on Mosaic GPU for bf16/fp16 (tests/test_pallas_mosaic.py); these
        # fp32 inputs, ragged_dot and tune are refused with NotImplementedError
        with pytest.raises(NotImplementedError, match="planned|bf16 and fp16 only"):
            call("mosaic")
        with pytest.raises(ValueError, match="backend must be one of"):
            call("cuda")
    ids = jnp.asarray([[1, 3], [0, 1], [3, 2]], jnp.int32)
    routed = [pallas_gg.route(ids, 4, backend=b) for b in ("auto", "triton", "mosaic")]
    for m_sizes, gather in routed:  # routing is plain jnp: the same on every lowering
        np.testing.assert_array_equal(m_sizes, [1, 2, 1, 2])
        np.testing.assert_array_equal(gather, routed[0][1])
    y = pallas_gg.grouped_gemm_forward(p.x, p.w, p.m_sizes, p.gather, 2, backend="triton")
    assert_close(y, p.ref_forward(), "float32", "forward, backend='triton'")


def test_numpy_inputs_are_accepted(second_gemm):
    p = second_gemm
    y = pallas_gg.grouped_gemm_forward(p.np["x"], p.np["w"], p.np["m_sizes"],
                                       p.np["gather_indices"], 2)
    assert_close(y, p.ref_forward(), "float32", "forward from numpy inputs")


# ---------------------------------------------------------------------------- tuning

@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the interpreted path")
def test_tune_on_cpu_times_nothing_and_returns_defaults(second_gemm, monkeypatch):
    p = second_gemm
    monkeypatch.setattr(tuning, "_tune_op", lambda *a, **k: pytest.fail("timed on CPU"))
    configs = pallas_gg.tune(p.x, p.w, p.m_sizes, p.gather, 2)
    # the defaults that fit shared memory for the dtype (fp32: the forward's fewer stages)
    assert configs == {op: gg_spec.default_config(op, p.x.dtype.name)
                       for op in ("forward", "dX", "dW")}
    assert not tuning_cache.cache_path("pallas").exists()


def test_autotune_uses_the_cached_config(second_gemm, monkeypatch):
    p = second_gemm
    key = tuning._key("forward", num_experts=4, n=p.w.shape[1], k=p.w.shape[2],
                      rows=p.x.shape[0], dtype="float32", permute_x=False, permute_y=True,
                      fuse_mul_post=False)
    tuning_cache.store("pallas", key, SMALL_CONFIGS["forward"], 0.1)
    assert pallas_gg.tune(p.x, p.w, p.m_sizes, p.gather, 2, permute_y=True,
                          ops=("forward",)) == {"forward": SMALL_CONFIGS["forward"]}
    seen = []
    real_forward = triton_lowering.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["config"])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(triton_lowering, "forward", spy)
    y = pallas_gg.grouped_gemm(p.x, p.w, p.m_sizes, p.gather, 2, permute_y=True,
                               autotune=True)
    assert seen == [SMALL_CONFIGS["forward"]]
    ref = reference.forward(p.np["x"], p.np["w"], *p.routing, permute_y=True)
    assert_close(y, ref, "float32", "autotuned forward")


@pytest.mark.parametrize("op", ["forward", "dX", "dW"])
def test_tuning_launch_passes_arrays_as_arguments(op):
    """The tuner's launches take the problem's arrays as arguments of a jitted function:
    the CUPTI timer jits what it times, and a function closing over the arrays would carry
    them into its program as constants (2 MB of W here; 0.8-2.7 GB at the real shapes)."""
    e, n, k, rows = 4, 256, 512, 64
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((e, n, k)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    problem = tuning._Problem(x, w, jnp.full((e,), rows // e, jnp.int32),
                              jnp.arange(rows, dtype=jnp.int32), 1, None, False)
    launch = tuning._launcher(op, problem, 1, dict(permute_x=False, permute_y=False), False,
                              gg_spec.default_config(op), interpret=True)
    program = launch.jitted.lower(*launch.args).as_text()
    assert len(program) < w.nbytes // 8, "the problem's arrays are baked into the program"


def test_tuning_mechanics_interpreted_and_under_jit(second_gemm):
    """The timing loop itself (run interpreted here, on two candidates), also while tracing:
    autotune under jax.jit times synthetic stand-ins eagerly."""
    p = second_gemm
    candidates = [SMALL_CONFIGS["dW"], gg_spec.default_config("dW")]
    problem = tuning._Problem(p.x, p.w, p.m_sizes, p.gather, 2, None, False)
    best, ms = tuning._tune_op("dW", problem, 2, dict(permute_x=False, permute_y=False),
                               False, iters=1, candidates=candidates, interpret=True)
    assert best in candidates and ms > 0

    @jax.jit
    def traced(x, m_sizes, gather):
        def measure():
            prob = tuning._Problem(x, p.w, m_sizes, gather, 2, None, False)
            assert not isinstance(prob.x, jax.core.Tracer)
            return tuning._tune_op("dX", prob, 2, dict(permute_x=False, permute_y=False),
                                   False, iters=1, candidates=[SMALL_CONFIGS["dX"]],
                                   interpret=True)
        best, ms = tuning._outside_any_trace(measure)
        assert best == SMALL_CONFIGS["dX"] and ms > 0
        return x

    traced(p.x, p.m_sizes, p.gather)


# ---------------------------------------------------------------------------- misc

def test_tile_table_covers_every_row_once():
    """Every row is owned by exactly one tile of its expert (rows past sum(m_sizes): the
    tail group, expert id E), whatever the sizes; padding slots own nothing."""
    rng = np.random.default_rng(1)
    table_of = jax.jit(schedule.row_tile_table, static_argnums=(1, 2))
    for _ in range(8):
        experts = int(rng.integers(1, 9))
        m_sizes = rng.integers(0, 40, experts).astype(np.int32)
        m_sizes[rng.random(experts) < 0.3] = 0
        rows = int(m_sizes.sum()) + int(rng.integers(0, 3))
        bm = int(rng.choice([16, 32]))
        table = np.asarray(table_of(jnp.asarray(m_sizes), rows, bm))
        assert table.shape == (3, schedule.max_row_tiles(rows, experts, bm))
        owner = np.full(rows, -1)
        offs = np.concatenate([[0], np.cumsum(m_sizes)])
        for e, lo, hi in table.T:
            for r in range(lo, min(lo + bm, hi)):
                assert owner[r] == -1
                owner[r] = e
        expected = np.concatenate([np.repeat(np.arange(experts), m_sizes),
                                   np.full(rows - offs[-1], experts)])
        np.testing.assert_array_equal(owner, expected)


@pytest.mark.parametrize("op", ["forward", "dX"])
def test_each_tile_writes_only_its_own_rows(op, monkeypatch):
    """Run the tiles of one expert at a time (the others made padding slots): exactly that
    expert's rows come out written (the interpreter leaves unwritten rows NaN) and right.
    In interpret mode tiles run in order, so a tile that also wrote its neighbour's first
    row would be overwritten by the owner and pass every other test; on a GPU it races."""
    rng = np.random.default_rng(4)
    m_sizes = np.array([5, 7, 0, 4], np.int32)
    m, k, n = int(m_sizes.sum()), 24, 20
    w = jnp.asarray(rng.standard_normal((4, n, k)), jnp.float32)
    operand = jnp.asarray(rng.standard_normal((m, k if op == "forward" else n)), jnp.float32)
    launch = {"forward": lambda cfg: triton_lowering.forward(
                  operand, w, jnp.asarray(m_sizes), None, None, topk=1, num_rows=m,
                  permute_x=False, permute_y=False, fuse_mul_post=False, config=cfg,
                  interpret=True),
              "dX": lambda cfg: triton_lowering.dx(
                  operand, w, jnp.asarray(m_sizes), None, num_rows=m, permute_x=False,
                  permute_y=False, config=cfg, interpret=True)}[op]
    config = (ForwardConfig if op == "forward" else DXConfig)(
        block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
    order = np.arange(m, dtype=np.int32)
    expected = (reference.forward(np.asarray(operand), np.asarray(w), m_sizes, order, 1)
                if op == "forward" else
                reference.dX(np.asarray(operand), np.asarray(w), m_sizes, order, 1))
    real_table = schedule.row_tile_table
    offs = np.concatenate([[0], np.cumsum(m_sizes)])
    for expert in np.flatnonzero(m_sizes):
        def one_expert(sizes, num_rows, block_m, expert=expert):
            table = real_table(sizes, num_rows, block_m)
            return jnp.where((table[0] == expert)[None, :], table, 0)
        monkeypatch.setattr(schedule, "row_tile_table", one_expert)
        jax.clear_caches()  # the launch is jitted: trace it again with this table
        out = np.asarray(launch(config))
        written = np.flatnonzero(np.isfinite(out).all(axis=1))
        np.testing.assert_array_equal(written, np.arange(offs[expert], offs[expert + 1]))
        rows = slice(offs[expert], offs[expert + 1])
        assert rel_error(out[rows], expected[rows]) < tolerance("float32")
    jax.clear_caches()  # no later test may reuse a trace with the restricted table


def test_triton_deprecation_warning_is_silenced():
    from pallas_gg._backend import quiet_triton_deprecation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_triton_deprecation():
            warnings.warn("The Pallas Triton backend is deprecated and will be removed",
                          DeprecationWarning)
    assert not caught


def test_users_do_not_see_the_triton_deprecation_warning():
    """A user's jax.jit lowers our kernels for a GPU (here AOT, for an abstract H100: the
    differentiable op with every kernel of its backward, and ragged_dot) under
    `-W error::DeprecationWarning`: the lowering's deprecation warning must not surface."""
    import pathlib
    import subprocess
    import sys
    code = """
import jax, jax.numpy as jnp
from jax._src.mesh import AbstractDevice, AbstractMesh
import pallas_gg
S = jax.ShapeDtypeStruct
args = (S((64, 32), jnp.bfloat16), S((4, 48, 32), jnp.bfloat16), S((4,), jnp.int32),
        S((64,), jnp.int32))
mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H100 80GB HBM3",
                                                                 None, "gpu"))
def loss(x, w, m, g, weights):
    y = pallas_gg.grouped_gemm(x, w, m, g, 2, permute_y=True, topk_weights=weights,
                               fuse_mul_post=True)
    z = pallas_gg.ragged_dot(y, w, m)  # [64, 48] @ [4, 48, 32]
    return jnp.sum(z.astype(jnp.float32))
with jax.sharding.use_abstract_mesh(mesh):
    jax.jit(jax.grad(loss, argnums=(0, 1, 4))).trace(
        *args, S((64,), jnp.float32)).lower(lowering_platforms=("cuda",))
"""
    subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                   check=True, cwd=pathlib.Path(__file__).resolve().parents[1])


def test_no_torch_import():
    import pathlib
    import subprocess
    import sys
    code = ("import sys, pallas_gg; assert pallas_gg.grouped_gemm; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=pathlib.Path(__file__).resolve().parents[1])


# ---------------------------------------------------------------------------- Triton lowering

def _triton_ir(kernel_call, *arg_shapes):
    """The Triton IR a kernel lowers to for an H100, obtained without a GPU: an AOT lowering
    for "cuda" under an abstract H100 device, capturing the module that Pallas hands to XLA
    (private JAX APIs of 0.11.2; the test skips if they moved)."""
    try:
        from jax._src.mesh import AbstractDevice, AbstractMesh
        from jax._src.pallas.triton import pallas_call_registration as registration
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"JAX internals moved: {e}")
    captured = []
    lower_module = registration.lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        # JAX 0.11.2 mistypes literals passed into a nested jit (jnp.where, //, %) when it
        # lowers to Triton: kernels must not contain any.
        assert "jit[" not in str(jaxpr), "nested jit in a kernel body"
        result = lower_module(jaxpr, *args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    h100 = AbstractDevice("NVIDIA H100 80GB HBM3", None, "gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=h100)
    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            jax.jit(kernel_call).trace(*arg_shapes).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower_module
    [ir] = captured
    return ir


@pytest.mark.parametrize("fusion", [Fusion(), Fusion(permute_x=True),
                                    Fusion(permute_y=True, fuse_mul_post=True)],
                         ids=lambda f: f.name)
@pytest.mark.parametrize("op", ["forward", "dX", "dW"])
def test_kernels_compile_for_hopper_without_a_gpu(op, fusion, tmp_path, monkeypatch):
    """Each kernel lowers to Triton IR for sm_90 and Triton (pip 3.6, the version the GPU
    machine uses for triton_gg; XLA bundles its own) compiles it to PTX with wgmma and
    16-byte cp.async loads through the gathered row pointers."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton_cache"))
    e, n, k, tokens, topk = 16, 384, 512, 64, 4
    rows = tokens * topk
    bf16 = jnp.bfloat16
    spec = jax.ShapeDtypeStruct
    x = spec((tokens if fusion.permute_x else rows, k), bf16)
    w, dy = spec((e, n, k), bf16), spec((rows, n), bf16)
    m_sizes, gather = spec((e,), jnp.int32), spec((rows,), jnp.int32)
    weights = spec((rows,), jnp.float32)
    flags = dict(permute_x=fusion.permute_x, permute_y=fusion.permute_y)
    config = gg_spec.default_config(op)
    if op == "forward":
        ir = _triton_ir(lambda *a: triton_lowering.forward(
            *a, topk=topk, num_rows=rows, fuse_mul_post=fusion.fuse_mul_post, config=config,
            interpret=False, **flags), x, w, m_sizes, gather, weights)
    elif op == "dX":
        ir = _triton_ir(lambda *a: triton_lowering.dx(
            *a, num_rows=rows, config=config, interpret=False, **flags), dy, w, m_sizes, gather)
    else:
        ir = _triton_ir(lambda *a: triton_lowering.dw(
            *a, topk=topk, config=config, interpret=False, **flags), x, dy, m_sizes, gather)
    path = tmp_path / f"{op}.ttir"
    path.write_text(ir)
    compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps,
                                       "num_stages": config.num_stages})
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    assert "cp.async.cg.shared.global" in ptx and ", 0x10" in ptx  # 16-byte async copies
    assert compiled.metadata.shared <= 227 * 1024


# ---------------------------------------------------------------------------- GPU

GPU_CASES = gpu_cases() + gpu_cases((128,), dtypes=("float32", "float16"))
# Mid-size real shapes (OLMoE) for the GPU tests that draw host inputs.
MID_CASES = [Case(get_shape(name), 128, "bfloat16", "random", fusion)
             for name in ("olmoe_1b_7b_w1", "olmoe_1b_7b_w2")
             for fusion in fusions_for(get_shape(name))]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids)
def test_gpu_direct_and_autograd(case):
    """Real model shapes in bf16 (and fp32, fp16 at 128 tokens) through the parity harness:
    inputs drawn on the GPU, the float64 reference computed there (host numpy would take
    minutes at these sizes)."""
    import parity
    parity.check(parity.Case.from_spec(case), "pallas_gg",
                 ops=("forward", "dX", "dW", "autograd"), device="cuda", reference="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("case", MID_CASES, ids=_ids)
def test_gpu_manual_config(case):
    configs = {op: c.replace(block_m=64) for op, c in SMALL_CONFIGS.items()}
    check_direct(Inputs(case), configs)


@pytest.mark.gpu
def test_gpu_autotune_one_shape():
    case = MID_CASES[1]
    inp = Inputs(case)
    configs = pallas_gg.tune(inp.x, inp.w, inp.m_sizes, inp.gather, case.topk, **inp.flags,
                             iters=3)
    assert tuning_cache.cache_path("pallas").exists()
    check_grads_vs_reference(inp, configs=configs)


@pytest.mark.gpu
def test_gpu_ragged_dot(rng):
    lhs, rhs, gs = _ragged_problem(rng, "bfloat16", [300, 0, 1000, 17], k=2048, n=768)
    out = jax.jit(pallas_gg.ragged_dot)(lhs, rhs, gs)
    ref = jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), gs,
                             precision=jax.lax.Precision.HIGHEST)
    assert_close(out, np.asarray(ref, np.float64), "bfloat16", "ragged_dot on GPU")


@pytest.mark.gpu
def test_gpu_offsets_past_2_pow_31():
    """M*K > 2**31 elements: the lowering must use 64-bit offsets for X, Y and dX."""
    tokens, k, n, experts, topk = 2**20 + 64, 2048, 128, 4, 1   # M*K ~ 2**31 + 2**17
    rng = np.random.default_rng(0)
    ids = rng.integers(0, experts, (tokens, topk)).astype(np.int32)
    m_sizes, gather = pallas_gg.route(jnp.asarray(ids), experts)
    x = jnp.asarray(rng.standard_normal((tokens, k), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((experts, n, k), np.float32) / np.sqrt(k),
                    jnp.bfloat16)
    y = pallas_gg.grouped_gemm_forward(x, w, m_sizes, gather, topk, permute_x=True)
    dx = pallas_gg.grouped_gemm_dX(y, w, m_sizes, gather, topk, permute_x=True)
    gather_np, m_np = np.asarray(gather), np.asarray(m_sizes)
    experts_of = np.repeat(np.arange(experts), m_np)
    for p in (0, 1, len(gather_np) // 2, len(gather_np) - 1):  # spot rows, the far end too
        row = np.asarray(x[gather_np[p] // topk], np.float64)
        w_e = np.asarray(w[experts_of[p]], np.float64)
        ref_y = w_e @ row
        assert rel_error(np.asarray(y[p], np.float64), ref_y) < 2e-2
        ref_dx = np.asarray(y[p], np.float64) @ w_e
        assert rel_error(np.asarray(dx[gather_np[p]], np.float64), ref_dx) < 2e-2


def test_tuning_candidates_drop_what_pallas_ignores():
    """pallas_gg honours no TMA switch and no warp specialization: its tuner resets them and
    times each remaining config once."""
    from pallas_gg.tuning import _honoured
    for op in ("forward", "dX", "dW"):
        found = _honoured(gg_spec.valid_candidates(op, with_tma=True))
        assert len(found) == len(set(found))
        for config in found:
            assert not any(getattr(config, f) for f in vars(config)
                           if f.startswith("tma_") or f == "warp_specialize"), config
