"""pallas_gg.moe_experts against an eager JAX loop (values and gradients, under jit), and
against triton_gg.moe_experts on the same numbers."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import pallas_gg  # noqa: E402
from pallas_gg.moe import init_params  # noqa: E402


def eager_experts(params, hidden, idx, weights):
    """Every expert on every token, masked by the routing (dense, obviously right)."""
    out = jnp.zeros_like(hidden)
    for e in range(params["gate_up_proj"].shape[0]):
        gate, up = jnp.split(hidden @ params["gate_up_proj"][e].T, 2, axis=-1)
        y = (jax.nn.silu(gate) * up) @ params["down_proj"][e].T
        weight = jnp.sum(jnp.where(idx == e, weights, 0.0), axis=1)
        out = out + y * weight[:, None]
    return out


def _problem(seed, tokens, experts, topk, hidden_size, inter):
    key = jax.random.PRNGKey(seed)
    kp, kh, ks, kw = jax.random.split(key, 4)
    params = init_params(kp, experts, hidden_size, inter)
    hidden = jax.random.normal(kh, (tokens, hidden_size))
    idx = jax.lax.top_k(jax.random.normal(ks, (tokens, experts)), topk)[1].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(kw, (tokens, topk)), axis=-1)
    return params, hidden, idx, weights


@pytest.mark.parametrize("tokens,experts,topk,hidden_size,inter",
                         [(11, 4, 2, 32, 24), (7, 6, 3, 40, 19), (5, 4, 1, 16, 16)])
def test_moe_experts_matches_eager(tokens, experts, topk, hidden_size, inter):
    params, hidden, idx, weights = _problem(tokens, tokens, experts, topk, hidden_size, inter)

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
