"""pallas_gg.moe_experts against an eager JAX loop (values and gradients, under jit), and
against triton_gg.moe_experts on the same numbers."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import pallas_gg  # noqa: E402
from pallas_gg.moe import init_params  # noqa: E402


def eager_experts(params, hidden, idx, weights):
    """Every expert on every token, masked by the routing (dense, obviously right); ids
    outside [0, E) match no expert."""
    out = jnp.zeros_like(hidden)
    b1, b2 = params.get("gate_up_proj_bias"), params.get("down_proj_bias")
    for e in range(params["gate_up_proj"].shape[0]):
        h = hidden @ params["gate_up_proj"][e].T + (0.0 if b1 is None else b1[e])
        gate, up = jnp.split(h, 2, axis=-1)
        y = (jax.nn.silu(gate) * up) @ params["down_proj"][e].T + (0.0 if b2 is None else b2[e])
        weight = jnp.sum(jnp.where(idx == e, weights, 0.0), axis=1)
        out = out + y * weight[:, None]
    return out


def _with_biases(params, seed=7):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    e, two_i, h = params["gate_up_proj"].shape
    return dict(params, gate_up_proj_bias=jax.random.normal(k1, (e, two_i)) * 0.1,
                down_proj_bias=jax.random.normal(k2, (e, h)) * 0.1)


def _problem(seed, tokens, experts, topk, hidden_size, inter):
    key = jax.random.PRNGKey(seed)
    kp, kh, ks, kw = jax.random.split(key, 4)
    params = init_params(kp, experts, hidden_size, inter)
    hidden = jax.random.normal(kh, (tokens, hidden_size))
    idx = jax.lax.top_k(jax.random.normal(ks, (tokens, experts)), topk)[1].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(kw, (tokens, topk)), axis=-1)
    return params, hidden, idx, weights


@pytest.mark.parametrize("tokens,experts,topk,hidden_size,inter,variant",
                         [(11, 4, 2, 32, 24, "plain"), (7, 6, 3, 40, 19, "plain"),
                          (5, 4, 1, 16, 16, "plain"), (9, 4, 2, 24, 8, "biases"),
                          (9, 4, 3, 24, 8, "foreign_ids")])
def test_moe_experts_matches_eager(tokens, experts, topk, hidden_size, inter, variant):
    params, hidden, idx, weights = _problem(tokens, tokens, experts, topk, hidden_size, inter)
    if variant == "biases":
        params = _with_biases(params)
    if variant == "foreign_ids":  # expert-parallel sentinels: contribute nothing
        idx = idx.at[::2, 0].set(experts).at[1, 1].set(-1)

    def loss(fn, params, hidden, weights):
        return jnp.sum(fn(params, hidden, idx, weights) ** 2)

    ours = jax.jit(lambda p, h, w: pallas_gg.moe_experts(p, h, idx, w))(params, hidden, weights)
    ref = eager_experts(params, hidden, idx, weights)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    g_ours = jax.jit(jax.grad(lambda p, h, w: loss(pallas_gg.moe_experts, p, h, w),
                              argnums=(0, 1, 2)))(params, hidden, weights)
    g_ref = jax.grad(lambda p, h, w: loss(eager_experts, p, h, w),
                     argnums=(0, 1, 2))(params, hidden, weights)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_torch_and_jax_layers_agree():
    """The two frameworks' expert layers compute the same block on the same numbers."""
    torch = pytest.importorskip("torch")
    triton_gg = pytest.importorskip("triton_gg")
    params, hidden, idx, weights = _problem(3, 9, 4, 2, 32, 24)
    out_jax = np.asarray(pallas_gg.moe_experts(params, hidden, idx, weights))

    def t(a):
        return torch.from_numpy(np.array(a))
    out_torch = triton_gg.moe_experts(t(hidden), t(params["gate_up_proj"]),
                                      t(params["down_proj"]), t(idx).long(), t(weights))
    np.testing.assert_allclose(out_torch.numpy(), out_jax, rtol=1e-4, atol=1e-5)


def test_validation():
    params, hidden, idx, weights = _problem(0, 5, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="tokens"):
        pallas_gg.moe_experts(params, hidden[:3], idx, weights)
    bad = dict(params, down_proj=params["down_proj"][:, :, :4])
    with pytest.raises(ValueError, match="down_proj"):
        pallas_gg.moe_experts(bad, hidden, idx, weights)
    with pytest.raises(ValueError, match=r"hidden must be a floating-point array, got int32"):
        pallas_gg.moe_experts(params, (hidden * 10).astype(jnp.int32), idx, weights)
    with pytest.raises(ValueError, match=r"params lacks \['down_proj'\]"):
        pallas_gg.moe_experts({"gate_up_proj": params["gate_up_proj"]}, hidden, idx, weights)
    with pytest.raises(ValueError, match=r"num_experts must be a positive int, got 0"):
        init_params(jax.random.PRNGKey(0), 0, 16, 8)


def test_torch_and_jax_layers_agree_with_biases_and_foreign_ids():
    torch = pytest.importorskip("torch")
    triton_gg = pytest.importorskip("triton_gg")
    params, hidden, idx, weights = _problem(5, 9, 4, 2, 32, 24)
    params = _with_biases(params)
    idx = idx.at[0].set(4).at[3, 1].set(7)
    out_jax = np.asarray(pallas_gg.moe_experts(params, hidden, idx, weights))

    def t(a):
        return torch.from_numpy(np.array(a))
    out_torch = triton_gg.moe_experts(
        t(hidden), t(params["gate_up_proj"]), t(params["down_proj"]), t(idx).long(),
        t(weights), gate_up_bias=t(params["gate_up_proj_bias"]),
        down_bias=t(params["down_proj_bias"]))
    np.testing.assert_allclose(out_torch.numpy(), out_jax, rtol=1e-4, atol=1e-5)
    assert np.all(out_jax[0] == 0)


def test_nnx_module():
    nnx = pytest.importorskip("flax.nnx")
    from pallas_gg.nnx import MoEExperts
    layer = MoEExperts(4, 16, 8, rngs=nnx.Rngs(0), bias=True)
    _, hidden, idx, weights = _problem(1, 6, 4, 2, 16, 8)
    out = nnx.jit(lambda m, h: m(h, idx, weights))(layer, hidden)
    np.testing.assert_allclose(out, eager_experts(layer.params(), hidden, idx, weights),
                               rtol=1e-4, atol=1e-5)
    grads = nnx.grad(lambda m: jnp.sum(m(hidden, idx, weights) ** 2))(layer)
    ref = jax.grad(lambda p: jnp.sum(eager_experts(p, hidden, idx, weights) ** 2))(
        layer.params())
    for name, g in ref.items():
        np.testing.assert_allclose(grads[name][...], g, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int, got -1"):
        MoEExperts(3, -1, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"backend must be one of"):
        MoEExperts(3, 16, 8, rngs=nnx.Rngs(0), backend="bogus")


@pytest.mark.gpu
def test_gpu_jax_block_agrees_with_torch_block_bf16():
    """Qwen3-30B-A3B expert shapes, T=256, bf16: pallas_gg.moe_experts and
    triton_gg.moe_experts on the same device numbers (DLPack), output and gradients."""
    torch = pytest.importorskip("torch")
    triton_gg = pytest.importorskip("triton_gg")
    import gg_spec
    t, e, k, h, i = 256, 128, 8, 2048, 768
    gen = torch.Generator(device="cuda").manual_seed(9)
    hidden = torch.randn(t, h, generator=gen, device="cuda").bfloat16()
    gate_up = (torch.randn(e, 2 * i, h, generator=gen, device="cuda") * h**-0.5).bfloat16()
    down = (torch.randn(e, h, i, generator=gen, device="cuda") * i**-0.5).bfloat16()
    top = torch.topk(torch.randn(t, e, generator=gen, device="cuda"), k, dim=-1)
    idx, weights = top.indices.int(), torch.softmax(top.values, -1).bfloat16()
    dout = torch.randn(t, h, generator=gen, device="cuda").bfloat16()
    ins = [x.clone().requires_grad_(True) for x in (hidden, gate_up, down, weights)]
    out_t = triton_gg.moe_experts(ins[0], ins[1], ins[2], idx, ins[3])
    grads_t = torch.autograd.grad(out_t, ins, dout)

    def j(x):
        return jax.dlpack.from_dlpack(x.contiguous())

    def block(p, hid, w):
        return pallas_gg.moe_experts(p, hid, j(idx), w)
    params = {"gate_up_proj": j(gate_up), "down_proj": j(down)}
    out_j, vjp = jax.vjp(jax.jit(block), params, j(hidden), j(weights))
    g_params, g_hidden, g_weights = vjp(j(dout))
    pairs = [(out_t, out_j), (grads_t[0], g_hidden), (grads_t[1], g_params["gate_up_proj"]),
             (grads_t[2], g_params["down_proj"]), (grads_t[3], g_weights)]
    for a, b in pairs:
        err = gg_spec.rel_error(np.asarray(jnp.asarray(b, jnp.float32)),
                                a.detach().float().cpu().numpy())
        assert err < gg_spec.tolerance("bfloat16"), err


def test_route_under_jit_sorts_foreign_ids_last():
    ids = jnp.asarray([[-1, 0], [2, 1], [3, 9]], jnp.int32)
    m_sizes, gather = jax.jit(lambda i: pallas_gg.route(i, 3))(ids)
    np.testing.assert_array_equal(m_sizes, [1, 1, 1])
    np.testing.assert_array_equal(gather[:3], [1, 3, 2])
    assert sorted(np.asarray(gather[3:]).tolist()) == [0, 4, 5]
