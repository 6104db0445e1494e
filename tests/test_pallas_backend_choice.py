"""backend="auto" on a JAX without Pallas' Triton lowering (deprecated by JAX in favour of
Mosaic GPU): the availability probe, the fallback to Mosaic GPU (in its interpreter on CPU)
with results checked against float64, the refusals that name what stands in the way, and
``import pallas_gg`` with ``jax.experimental.pallas.triton`` gone (a subprocess)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import pallas_gg  # noqa: E402
from gg_spec import reference, rel_error, tolerance  # noqa: E402
from pallas_gg import _backend  # noqa: E402
from pallas_gg._backend import TritonLoweringUnavailable  # noqa: E402

pytest.importorskip("jax.experimental.pallas.mosaic_gpu")


def test_probe_finds_the_triton_lowering_of_this_jax():
    """JAX 0.11 still has it (deprecated): the probe says so, and "auto" keeps it."""
    assert _backend.triton_lowering_available()
    assert _backend.triton_lowering_module().forward is not None
    assert _backend.pick_lowering("auto", op="forward", dtype=jnp.bfloat16, n=64, k=64,
                                  fused=False, config_given=False, interpret=True) == "triton"


@pytest.fixture
def no_triton(monkeypatch):
    """This JAX as one without the Triton lowering: the probe says no, and the lowering's
    entry points raise if anything still reaches them."""
    monkeypatch.setattr(_backend, "triton_lowering_available", lambda: False)
    from pallas_gg import triton_lowering

    def unreachable(*_, **__):
        raise AssertionError("the Triton lowering ran although it is unavailable")
    for name in ("forward", "dx", "dw"):
        monkeypatch.setattr(triton_lowering, name, unreachable)


BASE = dict(dtype=jnp.bfloat16, n=128, k=64, fused=False, config_given=False, interpret=True)


@pytest.mark.parametrize("op", ["forward", "dX", "dW"])
def test_auto_falls_back_to_mosaic(no_triton, monkeypatch, op):
    pick = _backend.pick_lowering
    assert pick("auto", op=op, **BASE) == "mosaic"                      # interpreter
    assert pick("auto", op=op, **{**BASE, "fused": True}) == "mosaic"
    assert pick("auto", op=op, **{**BASE, "n": 0}) == "mosaic"          # empty: zeros
    monkeypatch.setattr(_backend, "_on_hopper", lambda: True)
    assert pick("auto", op=op, **{**BASE, "interpret": False}) == "mosaic"
    # what Mosaic cannot run is refused with the reason, never routed to it
    for change, words in ((dict(dtype=jnp.float32), "bf16 and fp16 only"),
                          (dict(n=100), "multiples of 64"), (dict(k=2900), "multiples of 64")):
        with pytest.raises(TritonLoweringUnavailable, match=words):
            pick("auto", op=op, **{**BASE, **change})
    monkeypatch.setattr(_backend, "_on_hopper", lambda: False)
    with pytest.raises(TritonLoweringUnavailable, match="Hopper"):
        pick("auto", op=op, **{**BASE, "interpret": False})
    with pytest.raises(TritonLoweringUnavailable, match="backend='triton'"):
        pick("triton", op=op, **BASE)


def test_explicit_triton_and_triton_only_functions_raise_clearly(no_triton):
    x = jnp.ones((16, 64), jnp.bfloat16)
    w = jnp.ones((2, 64, 64), jnp.bfloat16)
    sizes = jnp.asarray([8, 8], jnp.int32)
    with pytest.raises(TritonLoweringUnavailable, match="jax.experimental.pallas.triton"):
        pallas_gg.grouped_gemm_forward(x, w, sizes, None, 1, backend="triton")
    with pytest.raises(TritonLoweringUnavailable, match="backend='triton'"):
        pallas_gg.grouped_gemm(x, w, sizes, None, 1, backend="triton")
    with pytest.raises(TritonLoweringUnavailable, match="not on Mosaic GPU yet"):
        pallas_gg.ragged_dot(x, w.transpose(0, 2, 1), sizes)
    # routing is plain jnp: "auto" runs
    m_sizes, _ = pallas_gg.route(jnp.asarray([[0], [1], [1]], jnp.int32), 2)
    np.testing.assert_array_equal(np.asarray(m_sizes), [1, 2])


def _problem(permute_x, seed=0):
    rng = np.random.default_rng(seed)
    t, topk, e, n, k = 13, 2, 3, 64, 64   # M = 26: not a multiple of 8 either
    ids = np.argsort(-rng.standard_normal((t, e)), axis=1)[:, :topk]
    m_sizes, gather = pallas_gg.route(jnp.asarray(ids, jnp.int32), e)
    x = jnp.asarray(rng.standard_normal((t if permute_x else t * topk, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((e, n, k)) / 8, jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((t * topk, n)), jnp.bfloat16)
    return topk, m_sizes, gather, x, w, dy


def _f32(*arrays):
    return [np.asarray(a, np.float32) for a in arrays]


def _spy_mosaic(monkeypatch):
    from pallas_gg.mosaic_lowering import ops as mosaic_ops
    calls = []
    for name in ("forward", "dx", "dw"):
        real = getattr(mosaic_ops, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append((_name, kw["interpret"]))
            return _real(*a, **kw)
        monkeypatch.setattr(mosaic_ops, name, spy)
    return calls


def test_auto_direct_calls_run_on_mosaic_interpreted(no_triton, monkeypatch):
    """forward, dX and dW with backend="auto" (defaults everywhere) run in Mosaic GPU's
    interpreter and match float64."""
    calls = _spy_mosaic(monkeypatch)
    topk, m_sizes, gather, x, w, dy = _problem(permute_x=False)
    sizes, g = np.asarray(m_sizes), np.asarray(gather)
    xr, wr, dyr = _f32(x, w, dy)
    tol = tolerance("bfloat16")
    y = pallas_gg.grouped_gemm_forward(x, w, m_sizes, gather, topk)
    assert rel_error(_f32(y)[0], reference.forward(xr, wr, sizes, g, topk)) < tol
    dx = pallas_gg.grouped_gemm_dX(dy, w, m_sizes, gather, topk, permute_y=True)
    assert rel_error(_f32(dx)[0], reference.dX(dyr, wr, sizes, g, topk, permute_y=True)) < tol
    dw = pallas_gg.grouped_gemm_dW(x, dy, m_sizes, gather, topk)
    assert rel_error(_f32(dw)[0], reference.dW(xr, dyr, sizes, g, topk)) < tol
    assert calls == [("forward", True), ("dx", True), ("dw", True)]


def test_auto_differentiable_op_runs_on_mosaic(no_triton, monkeypatch):
    """grouped_gemm(backend="auto") under jit and grad, permute_x: value and gradients from
    Mosaic GPU's interpreter against float64."""
    calls = _spy_mosaic(monkeypatch)
    topk, m_sizes, gather, x, w, dy = _problem(permute_x=True, seed=1)

    def loss(x, w):
        y = pallas_gg.grouped_gemm(x, w, m_sizes, gather, topk, permute_x=True)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    value, (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    xr, wr, dyr = _f32(x, w, dy)
    sizes, g = np.asarray(m_sizes), np.asarray(gather)
    y_ref = reference.forward(xr, wr, sizes, g, topk, permute_x=True)
    tol = tolerance("bfloat16")
    assert abs(float(value) - np.sum(y_ref * dyr)) <= tol * np.sum(np.abs(y_ref * dyr))
    ref_dx, ref_dw, _ = reference.grouped_gemm_grads(xr, wr, sizes, g, topk, dyr,
                                                     permute_x=True)
    assert rel_error(_f32(gx)[0], ref_dx) < tol
    assert rel_error(_f32(gw)[0], ref_dw) < tol
    assert sorted({name for name, _ in calls}) == ["dw", "dx", "forward"]


_HIDDEN = textwrap.dedent("""
    import sys
    sys.modules["jax.experimental.pallas.triton"] = None   # import of it raises ImportError
    import numpy as np, jax.numpy as jnp
    import pallas_gg
    from pallas_gg import _backend
    assert not _backend.triton_lowering_available()
    assert "pallas_gg.triton_lowering" not in sys.modules
    x = jnp.asarray(np.random.default_rng(0).standard_normal((10, 64)), jnp.bfloat16)
    w = jnp.ones((2, 64, 64), jnp.bfloat16)
    y = pallas_gg.grouped_gemm_forward(x, w, jnp.asarray([4, 6], jnp.int32), None, 1)
    ref = np.asarray(x, np.float32) @ np.ones((64, 64), np.float32)
    assert np.abs(np.asarray(y, np.float32) - ref).max() <= 2e-2 * np.abs(ref).max()
    try:
        pallas_gg.grouped_gemm_forward(x, w, jnp.asarray([4, 6], jnp.int32), None, 1,
                                       backend="triton")
    except _backend.TritonLoweringUnavailable:
        print("OK")
""")


def test_import_and_auto_without_the_triton_module():
    """A process where ``jax.experimental.pallas.triton`` cannot be imported: pallas_gg
    imports, the probe says no, and backend="auto" runs on Mosaic GPU's interpreter."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _HIDDEN], capture_output=True, text=True,
                         env=env, cwd=root, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("OK")


@pytest.mark.gpu
def test_gpu_auto_without_triton_compiles_mosaic(no_triton, monkeypatch):
    """On a Hopper GPU with the Triton lowering hidden: backend="auto" compiles the Mosaic
    GPU kernels (not interpreted), M = 1539 (not a multiple of 8), the differentiable op
    with permute_x against float64."""
    calls = _spy_mosaic(monkeypatch)
    rng = np.random.default_rng(2)
    t, topk, e, n, k = 513, 3, 8, 512, 256
    ids = np.argsort(-rng.standard_normal((t, e)), axis=1)[:, :topk]
    m_sizes, gather = pallas_gg.route(jnp.asarray(ids, jnp.int32), e)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((e, n, k)) / np.sqrt(k), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((t * topk, n)), jnp.bfloat16)

    def loss(x, w):
        y = pallas_gg.grouped_gemm(x, w, m_sizes, gather, topk, permute_x=True)
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    xr, wr, dyr = _f32(x, w, dy)
    ref_dx, ref_dw, _ = reference.grouped_gemm_grads(
        xr, wr, np.asarray(m_sizes), np.asarray(gather), topk, dyr, permute_x=True)
    assert rel_error(_f32(gx)[0], ref_dx) < tolerance("bfloat16")
    assert rel_error(_f32(gw)[0], ref_dw) < tolerance("bfloat16")
    assert calls and all(not interpret for _, interpret in calls)
