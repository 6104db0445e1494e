"""Holes a review found in the suites (issue 16): paths that a mutant of the library could
break without any test failing. Each test here was checked against the mutant it guards
against (see the comment above it).

* a frozen router (topk_weights without a gradient): dX and dW must still see the routing
  weights in dY, in triton_gg and pallas_gg;
* the dW path a GPU takes in triton_gg (a token-order X gathered into expert order before an
  unfused dW), forced on CPU;
* triton_gg with permute_x and fuse_mul_post together (its matrix pairs fuse_mul_post with the
  second GEMM only);
* argument errors that no test raised: topk_weights' length and dtype, m_sizes' and
  gather_indices' dtypes, dX with permute_x and M not a multiple of topk, negative m_sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gg_spec
from gg_spec import reference
from gg_spec.cases import Case, Fusion

triton_gg = pytest.importorskip("triton_gg")
pallas_gg = pytest.importorskip("pallas_gg")

# the suites' own helpers (tests/ is on sys.path under pytest's default import mode)
import test_pallas_gg as tp  # noqa: E402
import test_triton_gg as tt  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")

W1, W2 = gg_spec.get_shape("tiny_w1"), gg_spec.get_shape("tiny_w2")  # topk 2, 4 experts
TOKENS = 12
TORCH_CONFIGS = dict(forward_config=tt.SMALL_FWD, dx_config=tt.SMALL_DX,
                     dw_config=tt.SMALL_DW)

PX_MUL = Case(W1, TOKENS, "float32", "random", Fusion(permute_x=True, fuse_mul_post=True))
PY_MUL = Case(W2, TOKENS, "float32", "random", Fusion(permute_y=True, fuse_mul_post=True))
MUL = Case(W2, TOKENS, "float32", "random", Fusion(fuse_mul_post=True))
PX = Case(W1, TOKENS, "float32", "random", Fusion(permute_x=True))
PY = Case(W2, TOKENS, "float32", "random", Fusion(permute_y=True))


@pytest.fixture(autouse=True)
def _private_tuning_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GG_CACHE_DIR", str(tmp_path / "gg_cache"))


def _weights_are_not_ones(topk_weights):
    """A test of the routing-weight multiply needs weights that change the result."""
    w = np.asarray(topk_weights, dtype=np.float64)
    assert np.max(np.abs(w - 1.0)) > 0.2


def _torch_grads(inp: "tt.Inputs", *, weights_grad: bool):
    """grouped_gemm's Y and gradients (X, W, topk_weights or None) for upstream inp.dy."""
    x = inp.x.clone().requires_grad_(True)
    w = inp.w.clone().requires_grad_(True)
    tw = inp.topk_weights.clone().requires_grad_(weights_grad)
    y = triton_gg.grouped_gemm(x, w, *inp.routing, **dict(inp.fwd_flags, topk_weights=tw),
                               **TORCH_CONFIGS)
    y.backward(inp.dy)
    return y, x.grad, w.grad, tw.grad


def _reference_grads(inp: "tt.Inputs"):
    """float64 gradients of gg_spec's reference (numpy), as float64 torch tensors."""
    f = inp.case.fusion

    def np_(t):  # exact: every input dtype widens to float64
        return t.double().numpy()
    grads = reference.grouped_gemm_grads(
        np_(inp.x), np_(inp.w), inp.m_sizes.numpy(), inp.gather.numpy(), inp.case.topk,
        np_(inp.dy), permute_x=f.permute_x, permute_y=f.permute_y,
        topk_weights=np_(inp.topk_weights), fuse_mul_post=f.fuse_mul_post)
    return [None if g is None else torch.from_numpy(g) for g in grads]


# ------------------------------------------------------------ 1. frozen router, backward
# Mutant caught: triton_gg/_ops.py _backward scaling dY only when topk_weights needs a
# gradient (`if ctx.fuse_mul_post:` -> `if need_weights:`); pallas_gg/autodiff.py dropping
# the scale of dX (`dx = dx_unscaled * ...` -> `dx = dx_unscaled`) or of dW's dY.

@pytest.mark.parametrize("case", [PX_MUL, PY_MUL, MUL], ids=lambda c: c.fusion.name)
def test_triton_frozen_router_gradients_include_the_weights(case, monkeypatch):
    inp = tt.Inputs(case)
    _weights_are_not_ones(inp.topk_weights)
    tt.poison_new_outputs(monkeypatch)
    y, dx, dw, dtw = _torch_grads(inp, weights_grad=False)
    assert dtw is None
    ref_dx, ref_dw, _ = _reference_grads(inp)
    tt.assert_close(y, tt.expected_direct(inp, "forward"), case.dtype, "Y")
    tt.assert_close(dx, ref_dx, case.dtype, "grad X (frozen router)")
    tt.assert_close(dw, ref_dw, case.dtype, "grad W (frozen router)")


@pytest.mark.parametrize("how", ["closed_over", "stop_gradient"])
@pytest.mark.parametrize("case", [PX_MUL, PY_MUL], ids=lambda c: c.fusion.name)
def test_pallas_frozen_router_gradients_include_the_weights(case, how):
    inp = tp.Inputs(case)
    _weights_are_not_ones(inp.np["topk_weights"])
    f = case.fusion

    def loss(x, w, tw):
        if how == "stop_gradient":
            tw = jax.lax.stop_gradient(tw)
        y = pallas_gg.grouped_gemm(x, w, inp.m_sizes, inp.gather, case.topk, **inp.flags,
                                   topk_weights=tw, fuse_mul_post=True,
                                   forward_config=tp.SMALL_CONFIGS["forward"],
                                   dx_config=tp.SMALL_CONFIGS["dX"],
                                   dw_config=tp.SMALL_CONFIGS["dW"])
        return jnp.sum(y.astype(jnp.float32) * inp.dy.astype(jnp.float32))

    if how == "closed_over":
        dx, dw = jax.grad(lambda x, w: loss(x, w, inp.topk_weights), argnums=(0, 1))(
            inp.x, inp.w)
    else:
        dx, dw, dtw = jax.grad(loss, argnums=(0, 1, 2))(inp.x, inp.w, inp.topk_weights)
        assert np.all(np.asarray(dtw) == 0)
    ref_dx, ref_dw, _ = inp.ref_grads()
    assert f.fuse_mul_post
    tp.assert_close(dx, ref_dx, case.dtype, "grad X (frozen router)")
    tp.assert_close(dw, ref_dw, case.dtype, "grad W (frozen router)")


# ------------------------------------------------------------ 2. the GPU's dW path on CPU
# Mutant caught: triton_gg/_ops.py dw_with_gather testing permute_y instead of permute_x
# (`if permute_x and dw_gathers_x(x)` -> `if permute_y and dw_gathers_x(x)`): CPU runs
# never take the branch, so every other test passed.

@pytest.mark.parametrize("case", [PX, PY, PX_MUL, PY_MUL], ids=lambda c: c.fusion.name)
def test_triton_dw_with_x_gathered_first(case, monkeypatch):
    monkeypatch.setattr(triton_gg._ops, "dw_gathers_x", lambda x: True)
    calls = []
    real_dw = triton_gg._ops.dw_impl

    def spy_dw(x, dy, m_sizes, gather, topk, permute_x, permute_y, *rest):
        calls.append((tuple(x.shape), permute_x, permute_y))
        return real_dw(x, dy, m_sizes, gather, topk, permute_x, permute_y, *rest)
    monkeypatch.setattr(triton_gg._ops, "dw_impl", spy_dw)
    inp = tt.Inputs(case)
    tt.poison_new_outputs(monkeypatch)
    _, dx, dw, dtw = _torch_grads(inp, weights_grad=case.fusion.fuse_mul_post)
    m = case.tokens * case.topk
    # the branch ran: dW saw an expert-order X [M, K] without the gather fusion
    assert calls == [((m, inp.x.shape[1]), False, case.fusion.permute_y)]
    ref_dx, ref_dw, ref_dtw = _reference_grads(inp)
    tt.assert_close(dw, ref_dw, case.dtype, "grad W (X gathered first)")
    tt.assert_close(dx, ref_dx, case.dtype, "grad X")
    if case.fusion.fuse_mul_post:
        tt.assert_close(dtw, ref_dtw, case.dtype, "grad topk_weights")


# ------------------------------------------------------------ 3. permute_x + fuse_mul_post
# Mutants caught: the forward kernel reading the weight of the token instead of the routed
# row (`topk_weights_ptr + routed` -> `topk_weights_ptr + x_rows`); _backward's
# d_topk_weights left in expert order with permute_x (`if ctx.permute_y:` ->
# `if ctx.permute_y or ctx.permute_x:`).

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_permute_x_with_fuse_mul_post(dtype, monkeypatch):
    case = Case(W1, TOKENS, dtype, "random", Fusion(permute_x=True, fuse_mul_post=True))
    inp = tt.Inputs(case)
    tt.poison_new_outputs(monkeypatch)
    expected = tt.expected_direct(inp, "forward")
    y = triton_gg.grouped_gemm_forward(inp.x, inp.w, *inp.routing, **inp.fwd_flags,
                                       config=tt.SMALL_FWD)
    tt.assert_close(y, expected, dtype, "Y (direct)")
    y, dx, dw, dtw = _torch_grads(inp, weights_grad=True)
    ref_dx, ref_dw, ref_dtw = _reference_grads(inp)
    tt.assert_close(y, expected, dtype, "Y (autograd)")
    tt.assert_close(dx, ref_dx, dtype, "grad X")
    tt.assert_close(dw, ref_dw, dtype, "grad W")
    tt.assert_close(dtw, ref_dtw, dtype, "grad topk_weights")


# ------------------------------------------------------------ 4. argument errors

@pytest.fixture
def value_checks_on():
    previous = gg_spec.set_value_checks(True)
    yield
    gg_spec.set_value_checks(previous)


@pytest.fixture
def value_checks_off():
    previous = gg_spec.set_value_checks(False)
    yield
    gg_spec.set_value_checks(previous)


def _torch_args():
    inp = tt.Inputs(MUL)  # X [M, K] in expert order, M = 24
    return dict(X=inp.x, W=inp.w, m_sizes=inp.m_sizes, gather_indices=inp.gather,
                topk=MUL.topk, topk_weights=inp.topk_weights, dY=inp.dy)


def _jax_args():
    inp = tp.Inputs(MUL)
    return dict(X=inp.x, W=inp.w, m_sizes=inp.m_sizes, gather_indices=inp.gather,
                topk=MUL.topk, topk_weights=inp.topk_weights, dY=inp.dy)


BACKENDS = {"triton_gg": (triton_gg, _torch_args), "pallas_gg": (pallas_gg, _jax_args)}


def _as(a, like_torch: bool, dtype: str):
    if like_torch:
        return a.to(getattr(torch, dtype))
    return a.astype(jnp.dtype(dtype))


def _calls(lib, a, ops):
    """The calls of `ops` on argument dict `a` (forward and grouped_gemm with
    fuse_mul_post, so that topk_weights is read; dX and dW with permute_y)."""
    fwd = dict(topk_weights=a["topk_weights"], fuse_mul_post=True)
    routing = (a["m_sizes"], a["gather_indices"], a["topk"])
    table = {
        "forward": lambda: lib.grouped_gemm_forward(a["X"], a["W"], *routing, **fwd),
        "grouped_gemm": lambda: lib.grouped_gemm(a["X"], a["W"], *routing, **fwd),
        "dX": lambda: lib.grouped_gemm_dX(a["dY"], a["W"], *routing, permute_y=True),
        "dW": lambda: lib.grouped_gemm_dW(a["X"], a["dY"], *routing, permute_y=True),
    }
    return [(op, table[op]) for op in ops]


FWD_OPS = ("forward", "grouped_gemm")
ALL_OPS = ("forward", "grouped_gemm", "dX", "dW")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutate,ops,match", [
    (lambda a, t: dict(topk_weights=a["topk_weights"][:-1]), FWD_OPS,
     r"topk_weights has 23 entries .* 24 routed rows"),
    (lambda a, t: dict(topk_weights=_as(a["topk_weights"], t, "int32")), FWD_OPS,
     r"topk_weights must be a float dtype, got int32"),
    (lambda a, t: dict(m_sizes=_as(a["m_sizes"], t, "float32")), ALL_OPS,
     r"m_sizes must be int32 or int64, got float32"),
    (lambda a, t: dict(gather_indices=_as(a["gather_indices"], t, "float32")), ALL_OPS,
     r"gather_indices must be int32 or int64, got float32"),
], ids=["topk_weights_length", "topk_weights_int", "m_sizes_float", "gather_float"])
def test_argument_errors_name_the_argument(backend, mutate, ops, match):
    lib, make = BACKENDS[backend]
    a = make()
    a.update(mutate(a, backend == "triton_gg"))
    for op, call in _calls(lib, a, ops):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dx_permute_x_needs_rows_a_multiple_of_topk(backend):
    lib, make = BACKENDS[backend]
    a = make()
    m = 23  # not a multiple of topk = 2
    sizes = np.array([m - 3, 1, 1, 1], dtype=np.int32)
    gather = np.arange(m, dtype=np.int32)
    if backend == "triton_gg":
        dy, sizes, gather = a["dY"][:m], torch.from_numpy(sizes), torch.from_numpy(gather)
    else:
        dy, sizes, gather = a["dY"][:m], jnp.asarray(sizes), jnp.asarray(gather)
    with pytest.raises(ValueError, match=r"M=23 routed rows must be a multiple of topk=2"):
        lib.grouped_gemm_dX(dy, a["W"], sizes, gather, 2, permute_x=True)


def _negative_sizes(a, backend):
    """m_sizes with a negative entry and the right sum (24)."""
    sizes = np.array([-2, 10, 8, 8], dtype=np.int32)
    return torch.from_numpy(sizes) if backend == "triton_gg" else jnp.asarray(sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_m_sizes_refused_with_value_checks(backend, value_checks_on):
    lib, make = BACKENDS[backend]
    a = make()
    a["m_sizes"] = _negative_sizes(a, backend)
    for op, call in _calls(lib, a, ALL_OPS):
        with pytest.raises(ValueError, match=r"m_sizes must be non-negative, got a minimum of -2"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_m_sizes_not_read_without_value_checks(backend, value_checks_off):
    """With the value checks off a negative size is not looked at: the call returns (wrong
    numbers are allowed, an error or an access outside the tensors is not)."""
    lib, make = BACKENDS[backend]
    a = make()
    a["m_sizes"] = _negative_sizes(a, backend)
    for op, call in _calls(lib, a, ALL_OPS):
        out = call()
        assert out is not None, op


GUARD = 4096  # elements of NaN before and after every new float tensor


def guard_new_outputs(monkeypatch) -> list:
    """Every float tensor from torch.empty becomes a NaN-filled view into the middle of a
    larger buffer; the returned list holds (front guard, back guard) per tensor. A kernel
    that writes outside its output (a row offset below zero, say) changes a guard."""
    real_empty = torch.empty
    guards = []

    def guarded_empty(*size, **kwargs):
        out = real_empty(*size, **kwargs)
        if not out.is_floating_point() or kwargs.get("out") is not None:
            return out
        buf = real_empty(out.numel() + 2 * GUARD, dtype=out.dtype, device=out.device)
        buf.fill_(float("nan"))
        guards.append((buf[:GUARD], buf[GUARD + out.numel():]))
        return buf[GUARD:GUARD + out.numel()].view(out.shape)
    monkeypatch.setattr(torch, "empty", guarded_empty)
    return guards


def test_triton_negative_m_sizes_write_nothing_outside_the_outputs(value_checks_off,
                                                                  monkeypatch):
    """DESIGN.md: the kernels are memory-safe for any routing values. A negative size puts
    the next expert's first rows at offsets below zero (at d062ee3 the forward wrote there,
    and the Triton interpreter's stray writes later aborted the process)."""
    a = _torch_args()
    a["m_sizes"] = _negative_sizes(a, "triton_gg")
    x = a["X"].clone().requires_grad_(True)
    w = a["W"].clone().requires_grad_(True)
    guards = guard_new_outputs(monkeypatch)
    for op, call in _calls(triton_gg, dict(a, X=x, W=w), ALL_OPS):
        del guards[:]
        out = call()
        if op == "grouped_gemm":
            out.backward(a["dY"])
        assert guards, op
        for front, back in guards:
            assert bool(torch.isnan(front).all()) and bool(torch.isnan(back).all()), \
                f"{op}: a kernel wrote outside its output"
