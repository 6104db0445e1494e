"""What a user gets with the defaults, on the GPU (`-m gpu`): every public path captured in a
CUDA graph and run under ``torch.cuda.set_sync_debug_mode("error")`` (no host sync), and bad
routing values with the value checks off (the default) in a subprocess each: the process
survives, the call returns.

Shapes are Qwen3-30B-A3B's experts at a few hundred tokens: real tiles, short runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

T, E, TOPK, H, I = 256, 128, 8, 2048, 768


@contextlib.contextmanager
def sync_debug_error():
    """Any synchronizing CUDA call in the block raises."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _inputs(dtype=torch.bfloat16, seed=0):
    import triton_gg
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn((T, E), generator=gen, device="cuda")
    weights, ids = torch.softmax(logits, -1).topk(TOPK, dim=-1)
    m_sizes, gather = triton_gg.route(ids, E)

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=gen, device="cuda", dtype=dtype) * scale
    return dict(ids=ids, weights=(weights / weights.sum(-1, keepdim=True)).to(dtype),
                m_sizes=m_sizes, gather=gather, x_tokens=randn(T, H),
                x=randn(T * TOPK, H), w1=randn(E, 2 * I, H, scale=H ** -0.5),
                w2=randn(E, H, I, scale=I ** -0.5), a=randn(T * TOPK, I),
                dy1=randn(T * TOPK, 2 * I), dy2=randn(T * TOPK, H), dh=randn(T, H))


def _capture_and_compare(fn):
    """Warm fn up on a side stream (compilation, config lookup), run it eagerly under the
    sync check, capture it in a CUDA graph, replay, and compare the replay with the eager
    result (the kernels are deterministic: equal)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager runs off the default stream, as torch's docs ask:
        fn()                       # autograd's leaf nodes keep the stream they first ran on
        torch.cuda.synchronize()
        with sync_debug_error():
            eager = [t.clone() for t in fn()]
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_graph_capture_direct_ops():
    import triton_gg
    p = _inputs()
    r = (p["m_sizes"], p["gather"], TOPK)
    tw = p["weights"].reshape(-1)
    _capture_and_compare(lambda: (
        triton_gg.grouped_gemm_forward(p["x"], p["w1"], *r),
        triton_gg.grouped_gemm_forward(p["x_tokens"], p["w1"], *r, permute_x=True),
        triton_gg.grouped_gemm_forward(p["a"], p["w2"], *r, permute_y=True, topk_weights=tw,
                                       fuse_mul_post=True),
        triton_gg.grouped_gemm_dX(p["dy1"], p["w1"], *r, permute_x=True),
        triton_gg.grouped_gemm_dX(p["dy2"], p["w2"], *r, permute_y=True),
        triton_gg.grouped_gemm_dW(p["x_tokens"], p["dy1"], *r, permute_x=True),
        triton_gg.grouped_gemm_dW(p["a"], p["dy2"], *r, permute_y=True)))


def test_graph_capture_grouped_mm_step():
    import triton_gg
    p = _inputs()
    offs = torch.cumsum(p["m_sizes"], 0).to(torch.int32)
    a = p["x"].clone().requires_grad_(True)
    w = p["w1"].clone().requires_grad_(True)

    def step():
        out = triton_gg.grouped_mm(a, w.transpose(1, 2), offs)
        da, dw = torch.autograd.grad(out, (a, w), p["dy1"])
        return out, da, dw
    _capture_and_compare(step)


def test_graph_capture_autograd_step():
    """One MoE MLP step through the differentiable op: both GEMMs with their fusions, the
    routing weights trained (fuse_mul_post with a gradient)."""
    import triton_gg
    p = _inputs()
    r = (p["m_sizes"], p["gather"], TOPK)
    x = p["x_tokens"].clone().requires_grad_(True)
    w1 = p["w1"].clone().requires_grad_(True)
    w2 = p["w2"].clone().requires_grad_(True)
    tw = p["weights"].reshape(-1).clone().requires_grad_(True)

    def step():
        h = triton_gg.grouped_gemm(x, w1, *r, permute_x=True)
        gate, up = h.chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * up
        y = triton_gg.grouped_gemm(act, w2, *r, permute_y=True,
                                   topk_weights=tw, fuse_mul_post=True)
        out = y.view(T, TOPK, -1).sum(1)
        grads = torch.autograd.grad(out, (x, w1, w2, tw), p["dh"])
        return (out, *grads)
    _capture_and_compare(step)


def test_graph_capture_expert_block():
    import triton_gg
    p = _inputs()
    hidden = p["x_tokens"].clone().requires_grad_(True)
    gate_up = p["w1"].clone().requires_grad_(True)
    down = p["w2"].clone().requires_grad_(True)
    weights = p["weights"].clone().requires_grad_(True)

    def step():
        out = triton_gg.moe_experts(hidden, gate_up, down, p["ids"], weights)
        grads = torch.autograd.grad(out, (hidden, gate_up, down, weights), p["dh"])
        return (out, *grads)
    _capture_and_compare(step)


# ------------------------------------------------------------- bad routing, checks off

BAD_ROUTING = ["sum_past_m", "sum_short", "negative_size", "huge_size", "gather_past_end",
               "gather_negative", "gather_repeated"]

_TORCH_SCRIPT = """
import torch, triton_gg
import gg_spec
assert not gg_spec.value_checks_enabled()
kind = {kind!r}
E, T, K, N, TOPK = 8, 200, 256, 384, 2
M = T * TOPK
g = torch.Generator(device="cuda").manual_seed(0)
ids = torch.randint(0, E, (T, TOPK), generator=g, device="cuda")
m_sizes, gather = triton_gg.route(ids, E)
{corrupt}
for dtype in (torch.bfloat16, torch.float32):
    x_tok = torch.randn(T, K, generator=g, device="cuda").to(dtype)
    x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
    w = torch.randn(E, N, K, generator=g, device="cuda").to(dtype)
    dy = torch.randn(M, N, generator=g, device="cuda").to(dtype)
    tw = torch.rand(M, generator=g, device="cuda").to(dtype)
    r = (m_sizes, gather, TOPK)
    outs = [
        triton_gg.grouped_gemm_forward(x, w, *r),
        triton_gg.grouped_gemm_forward(x_tok, w, *r, permute_x=True),
        triton_gg.grouped_gemm_forward(x, w, *r, permute_y=True, topk_weights=tw,
                                       fuse_mul_post=True),
        triton_gg.grouped_gemm_forward(x, w, *r, topk_weights=tw, fuse_mul_post=True),
        triton_gg.grouped_gemm_dX(dy, w, *r),
        triton_gg.grouped_gemm_dX(dy, w, *r, permute_x=True),
        triton_gg.grouped_gemm_dX(dy, w, *r, permute_y=True),
        triton_gg.grouped_gemm_dW(x, dy, *r),
        triton_gg.grouped_gemm_dW(x_tok, dy, *r, permute_x=True),
        triton_gg.grouped_gemm_dW(x, dy, *r, permute_y=True),
        triton_gg.grouped_mm(x, w.transpose(1, 2), torch.cumsum(m_sizes, 0).to(torch.int32)),
    ]
    xg = x_tok.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    y = triton_gg.grouped_gemm(xg, wg, *r, permute_x=True)
    torch.autograd.grad(y, (xg, wg), dy)
    torch.cuda.synchronize()
print("SURVIVED", kind)
"""

_JAX_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp
import gg_spec, pallas_gg
assert not gg_spec.value_checks_enabled()
kind = {kind!r}
E, T, K, N, TOPK = 8, 200, 256, 384, 2
M = T * TOPK
rng = np.random.default_rng(0)
ids = rng.integers(0, E, (T, TOPK))
m_sizes, gather = (np.asarray(a) for a in gg_spec.route(ids, E))
m_sizes, gather = m_sizes.astype(np.int32).copy(), gather.astype(np.int32).copy()
{corrupt}
m_sizes, gather = jnp.asarray(m_sizes), jnp.asarray(gather)
for dtype in (jnp.bfloat16, jnp.float32):
    x_tok = jnp.asarray(rng.standard_normal((T, K)), dtype)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((E, N, K)), dtype)
    dy = jnp.asarray(rng.standard_normal((M, N)), dtype)
    tw = jnp.asarray(rng.random(M), dtype)
    r = (m_sizes, gather, TOPK)
    outs = [
        pallas_gg.grouped_gemm_forward(x, w, *r),
        pallas_gg.grouped_gemm_forward(x_tok, w, *r, permute_x=True),
        pallas_gg.grouped_gemm_forward(x, w, *r, permute_y=True, topk_weights=tw,
                                       fuse_mul_post=True),
        pallas_gg.grouped_gemm_dX(dy, w, *r),
        pallas_gg.grouped_gemm_dX(dy, w, *r, permute_x=True),
        pallas_gg.grouped_gemm_dX(dy, w, *r, permute_y=True),
        pallas_gg.grouped_gemm_dW(x, dy, *r),
        pallas_gg.grouped_gemm_dW(x_tok, dy, *r, permute_x=True),
        pallas_gg.grouped_gemm_dW(x, dy, *r, permute_y=True),
        pallas_gg.ragged_dot(x, jnp.swapaxes(w, 1, 2), m_sizes),
        jax.grad(lambda a, b: pallas_gg.grouped_gemm(a, b, *r, permute_x=True).sum(),
                 argnums=(0, 1))(x_tok, w),
    ]
    if dtype == jnp.bfloat16:
        outs += [pallas_gg.grouped_gemm_forward(x, w, *r, backend="mosaic"),
                 pallas_gg.grouped_gemm_dX(dy, w, *r, backend="mosaic"),
                 pallas_gg.grouped_gemm_dW(x, dy, *r, backend="mosaic")]
    jax.block_until_ready(outs)
print("SURVIVED", kind)
"""

_CORRUPT = {
    "sum_past_m": "m_sizes[-1] += 1000",
    "sum_short": "m_sizes[0] -= 5",
    "negative_size": "m_sizes[1] -= 300; m_sizes[2] += 300",
    "huge_size": "m_sizes[0] = 2 ** 30",
    "gather_past_end": "gather[3] = M + 10 ** 6",
    "gather_negative": "gather[5] = -(10 ** 6)",
    "gather_repeated": "gather[1] = gather[0]",
}


def _run_script(script: str, tmp_dir: str):
    # the subprocesses share compiled kernels: Triton's cache is on disk already; JAX's
    # persistent cache is switched on for every size of entry
    env = dict(os.environ, GG_VALUE_CHECKS="0", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               JAX_COMPILATION_CACHE_DIR=os.path.join(tmp_dir, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def shared_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bad_routing"))


@pytest.mark.parametrize("kind", BAD_ROUTING)
def test_bad_routing_never_an_illegal_address_torch(kind, shared_tmp):
    done = _run_script(textwrap.dedent(_TORCH_SCRIPT).format(kind=kind,
                                                             corrupt=_CORRUPT[kind]),
                       shared_tmp)
    assert done.returncode == 0 and f"SURVIVED {kind}" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("kind", BAD_ROUTING)
def test_bad_routing_never_an_illegal_address_jax(kind, shared_tmp):
    pytest.importorskip("jax")
    done = _run_script(textwrap.dedent(_JAX_SCRIPT).format(kind=kind, corrupt=_CORRUPT[kind]),
                       shared_tmp)
    assert done.returncode == 0 and f"SURVIVED {kind}" in done.stdout, done.stderr[-3000:]
