"""triton_gg.moe_experts against an eager per-expert loop: output and every gradient."""

import pytest
import torch

triton_gg = pytest.importorskip("triton_gg")


def eager_experts(hidden, gate_up, down, idx, weights, act=torch.nn.functional.silu):
    """The Hugging Face style loop: each expert on the tokens that chose it."""
    out = hidden * 0.0  # in the graph even when no expert has a token
    for e in range(gate_up.shape[0]):
        token, slot = torch.nonzero(idx == e, as_tuple=True)
        if token.numel() == 0:
            continue
        gate, up = (hidden[token] @ gate_up[e].T).chunk(2, dim=-1)
        y = (act(gate) * up) @ down[e].T
        out = out.index_add(0, token, y * weights[token, slot, None])
    return out


@pytest.mark.parametrize("tokens,experts,topk,hidden_size,inter", [
    (13, 4, 2, 32, 24), (9, 6, 3, 40, 19), (5, 8, 1, 16, 16), (0, 4, 2, 16, 8)])
def test_moe_experts_matches_eager(tokens, experts, topk, hidden_size, inter):
    gen = torch.Generator().manual_seed(tokens * 100 + experts)
    hidden = torch.randn(tokens, hidden_size, generator=gen, requires_grad=True)
    gate_up = (torch.randn(experts, 2 * inter, hidden_size, generator=gen) / hidden_size**0.5
               ).requires_grad_(True)
    down = (torch.randn(experts, hidden_size, inter, generator=gen) / inter**0.5
            ).requires_grad_(True)
    scores = torch.randn(tokens, experts, generator=gen)
    idx = torch.topk(scores, topk, dim=-1).indices
    weights = torch.softmax(torch.randn(tokens, topk, generator=gen), -1).requires_grad_(True)
    dout = torch.randn(tokens, hidden_size, generator=gen)

    ours = triton_gg.moe_experts(hidden, gate_up, down, idx, weights)
    grads = torch.autograd.grad(ours, (hidden, gate_up, down, weights), dout,
                                allow_unused=True)
    ref = eager_experts(hidden, gate_up, down, idx, weights)
    ref_grads = torch.autograd.grad(ref, (hidden, gate_up, down, weights), dout,
                                    allow_unused=True)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        r = torch.zeros_like(g) if r is None else r
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_module_and_validation():
    torch.manual_seed(0)
    layer = triton_gg.MoEExperts(4, 16, 8)
    hidden = torch.randn(7, 16)
    idx = torch.randint(0, 4, (7, 1))
    weights = torch.ones(7, 1)
    out = layer(hidden, idx, weights)
    assert out.shape == (7, 16)
    ref = eager_experts(hidden, layer.gate_up_proj, layer.down_proj, idx, weights)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="down_proj"):
        triton_gg.moe_experts(hidden, layer.gate_up_proj, layer.down_proj[:, :, :4], idx,
                              weights)
    with pytest.raises(ValueError, match="tokens"):
        triton_gg.moe_experts(hidden[:5], layer.gate_up_proj, layer.down_proj, idx, weights)
    args = (hidden, layer.gate_up_proj, layer.down_proj, idx)
    with pytest.raises(ValueError, match=r"one device.*'top_k_weights': 'meta'"):
        triton_gg.moe_experts(*args, weights.to("meta"))
    with pytest.raises(ValueError, match=r"one device.*'down_proj bias': 'meta'"):
        triton_gg.moe_experts(*args, weights, down_bias=torch.zeros(4, 16, device="meta"))
    with pytest.raises(ValueError, match=r"hidden and top_k_weights must be floating point"):
        triton_gg.moe_experts((hidden * 10).int(), *args[1:], weights)
    with pytest.raises(TypeError, match=r"hidden must be a torch.Tensor, got ndarray"):
        triton_gg.moe_experts(hidden.numpy(), *args[1:], weights)
    with pytest.raises(ValueError, match=r"hidden_size must be a positive int, got -1"):
        triton_gg.MoEExperts(4, -1, 8)
    assert triton_gg.MoEExperts(torch.tensor(2), 8, 4).gate_up_proj.shape == (2, 8, 8)


def test_biases_and_foreign_ids_match_eager():
    """Optional biases (the second weighted by the routing weight, as the eager HF loop does)
    and ids outside [0, E), which contribute nothing; gradients of every input."""
    gen = torch.Generator().manual_seed(11)
    t, e, k, h, i = 9, 4, 3, 24, 8
    hidden = torch.randn(t, h, generator=gen, requires_grad=True)
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).requires_grad_(True)
    down = (torch.randn(e, h, i, generator=gen) / i**0.5).requires_grad_(True)
    b1 = (torch.randn(e, 2 * i, generator=gen) * 0.1).requires_grad_(True)
    b2 = (torch.randn(e, h, generator=gen) * 0.1).requires_grad_(True)
    idx = torch.topk(torch.randn(t, e, generator=gen), k, dim=-1).indices
    idx[::2, 0] = e
    idx[1, 1] = -1
    weights = torch.softmax(torch.randn(t, k, generator=gen), -1).requires_grad_(True)
    inputs = (hidden, gate_up, down, b1, b2, weights)

    ours = triton_gg.moe_experts(hidden, gate_up, down, idx, weights, gate_up_bias=b1,
                                 down_bias=b2)
    ref = hidden * 0.0
    for ex in range(e):
        token, slot = torch.nonzero(idx == ex, as_tuple=True)
        gate, up = (hidden[token] @ gate_up[ex].T + b1[ex]).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ down[ex].T + b2[ex]
        ref = ref.index_add(0, token, y * weights[token, slot, None])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    dout = torch.randn(t, h, generator=gen)
    for g, r in zip(torch.autograd.grad(ours, inputs, dout),
                    torch.autograd.grad(ref, inputs, dout)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_no_host_sync_in_the_block(monkeypatch):
    """Routing is built on the device and trusted: no value check (a host read) runs."""
    import triton_gg._validate as v
    reads = []
    monkeypatch.setattr(v.checks, "check_values", lambda *a: reads.append(a))
    layer = triton_gg.MoEExperts(4, 16, 8)
    with triton_gg.value_checks():  # even with the opt-in checks on
        layer(torch.randn(5, 16), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)).sum().backward()
    assert reads == []
    x = torch.randn(6, 16)
    m_sizes = torch.tensor([6, 0, 0, 0], dtype=torch.int32)
    triton_gg.grouped_gemm_forward(x, layer.gate_up_proj.detach(), m_sizes, None, 1)
    assert reads == []  # a direct call checks only with the opt-in checks on
    with triton_gg.value_checks():
        triton_gg.grouped_gemm_forward(x, layer.gate_up_proj.detach(), m_sizes, None, 1)
    assert len(reads) == 1


@pytest.mark.gpu
def test_gpu_block_bf16_matches_float64_loop():
    """Qwen3-30B-A3B expert shapes (E=128, H=2048, I=768, k=8), T=256, bf16 on the GPU,
    against the eager loop in float64 on the same (rounded) numbers: output and gradients."""
    import gg_spec
    gen = torch.Generator(device="cuda").manual_seed(5)
    t, e, k, h, i = 256, 128, 8, 2048, 768

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=gen, device="cuda") * scale
    hidden = randn(t, h).bfloat16().requires_grad_(True)
    gate_up = randn(e, 2 * i, h, scale=h**-0.5).bfloat16().requires_grad_(True)
    down = randn(e, h, i, scale=i**-0.5).bfloat16().requires_grad_(True)
    top = torch.topk(torch.softmax(randn(t, e), -1), k, dim=-1)
    idx, weights = top.indices, top.values.bfloat16().requires_grad_(True)
    dout = randn(t, h).bfloat16()
    inputs = (hidden, gate_up, down, weights)
    ours = triton_gg.moe_experts(hidden, gate_up, down, idx, weights)
    grads = torch.autograd.grad(ours, inputs, dout)
    ref_in = [x.detach().double().requires_grad_(True) for x in inputs]
    ref = eager_experts(ref_in[0], ref_in[1], ref_in[2], idx, ref_in[3])
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    tol = gg_spec.tolerance("bfloat16")
    for name, a, b in zip(("out", "d_hidden", "d_gate_up", "d_down", "d_weights"),
                          (ours, *grads), (ref, *ref_grads)):
        err = gg_spec.rel_error(a.detach().double().cpu(), b.detach().cpu())
        assert err < tol, f"{name}: rel error {err:.2e}"


def test_route_sorts_foreign_ids_last():
    """Ids outside [0, E) count for no expert and come after every expert's rows, whatever
    their sign (the MoE blocks drop other ranks' slots this way)."""
    m_sizes, gather = triton_gg.route(torch.tensor([[-1, 0], [2, 1], [3, 9]]), 3)
    assert m_sizes.tolist() == [1, 1, 1]
    assert gather[:3].tolist() == [1, 3, 2] and sorted(gather[3:].tolist()) == [0, 4, 5]


@pytest.mark.parametrize("gathers", [True, False])
def test_first_gemm_backward_uses_the_keys_it_runs_under(monkeypatch, gathers):
    """The block's first GEMM runs dX without permute_x (in expert order) and, where dW
    runs on a gathered copy of X (on a GPU), dW unfused too: autotune must pick the configs
    tuned for the keys the kernels actually run under."""
    from types import SimpleNamespace

    import gg_spec
    from triton_gg import _ops, moe
    from triton_gg import autotune as cache
    tokens, experts, topk, h, n = 12, 4, 2, 32, 48
    x = torch.randn(tokens, h)
    w1 = torch.randn(experts, n, h)
    m_sizes, gather = triton_gg.route(torch.randint(0, experts, (tokens, topk)), experts)
    dims = SimpleNamespace(num_experts=experts, n=n, k=h, m=tokens * topk)
    unfused = {"dX": gg_spec.DXConfig(block_m=32, block_n=32, block_k=64),
               "dW": gg_spec.DWConfig(block_m=64, block_n=32, block_k=32)}
    fused = {"dX": gg_spec.DXConfig(block_m=16), "dW": gg_spec.DWConfig(block_m=16)}
    memory = {}
    for op in ("dX", "dW"):
        memory[cache.key_for(op, dims, x.dtype, x.device)] = unfused[op]
        memory[cache.key_for(op, dims, x.dtype, x.device, permute_x=True)] = fused[op]
    monkeypatch.setattr(cache, "_memory", memory)
    monkeypatch.setattr(_ops, "dw_gathers_x", lambda x: gathers)
    _, dx_cfg, dw_cfg = moe._first_gemm_configs(x, w1, m_sizes, gather, topk, True)
    assert dx_cfg == _ops.encode(unfused["dX"])
    assert dw_cfg == _ops.encode(unfused["dW"] if gathers else fused["dW"])
