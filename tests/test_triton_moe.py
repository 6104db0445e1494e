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
