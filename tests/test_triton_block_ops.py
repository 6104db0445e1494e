"""The MoE block's own kernels against torch references: the SiLU-gated first GEMM
(forward and backward) and the top-k combine (forward and backward), with poisoned outputs,
odd sizes (tails in every dimension), empty experts and no tokens; and the block under
torch.compile(fullgraph=True)."""

import pytest
import torch

triton_gg = pytest.importorskip("triton_gg")

from gg_spec import ForwardConfig, default_config  # noqa: E402
from triton_gg import _block_ops, _ops  # noqa: E402
from triton_gg.moe import _inverse  # noqa: E402


def _routing(tokens, experts, topk, gen, empty=()):
    scores = torch.randn(tokens, experts, generator=gen)
    for e in empty:
        scores[:, e] = -1e9
    idx = torch.topk(scores, topk, dim=-1).indices
    return idx, *triton_gg.route(idx, experts)


def _swiglu_reference(x, w, m_sizes, gather, topk):
    """Float64: H = X[gather // k] @ W[e].T row by row, A = silu(gate) * up."""
    rows = x.double()[gather.long() // topk]
    experts = torch.repeat_interleave(torch.arange(w.shape[0]), m_sizes.long())
    h = torch.einsum("mk,mnk->mn", rows, w.double()[experts])
    gate, up = h.chunk(2, dim=-1)
    return h, torch.nn.functional.silu(gate) * up


# small tiles so that the odd sizes leave tails in M, the gate/up halves and K
SMALL = ForwardConfig(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=2)


@pytest.mark.parametrize("tokens,experts,topk,hidden,inter,empty", [
    (13, 4, 2, 24, 24, ()), (9, 6, 3, 40, 19, (1, 4)), (5, 3, 1, 17, 8, ()),
    (0, 4, 2, 16, 8, ())])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gemm_forward_and_backward(tokens, experts, topk, hidden, inter, empty, dtype):
    gen = torch.Generator().manual_seed(tokens + 7 * experts)
    idx, m_sizes, gather = _routing(tokens, experts, topk, gen, empty)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w.requires_grad_(True)
    cfgs = [_ops.encode(c) for c in (SMALL, default_config("dX"), default_config("dW"))]
    a = _block_ops.swiglu_gemm(x, w, m_sizes, gather, topk, True, *cfgs)
    h, a_direct = _block_ops.swiglu_gemm_impl(x.detach(), w.detach(), m_sizes, gather, topk,
                                              True, cfgs[0])
    assert torch.equal(a.detach(), a_direct)
    ref_h, ref_a = _swiglu_reference(x.detach(), w.detach(), m_sizes, gather, topk)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4,
                                                                        atol=1e-5)
    torch.testing.assert_close(h.double(), ref_h, **tol)
    torch.testing.assert_close(a.double(), ref_a, **tol)

    da = torch.randn(a.shape, generator=gen).to(dtype)
    gx, gw = torch.autograd.grad(a, (x, w), da)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    _, ref_a64 = _swiglu_reference(x64, w64, m_sizes, gather, topk)
    rx, rw = torch.autograd.grad(ref_a64, (x64, w64), da.double())
    torch.testing.assert_close(gx.double(), rx, **tol)
    torch.testing.assert_close(gw.double(), rw, **tol)
    for e in empty:
        assert torch.all(gw[e] == 0)


def test_swiglu_gemm_outputs_every_row(monkeypatch):
    """Poisoned outputs: every routed row of H and A is written (the launcher allocates
    with torch.empty; NaN-filled here) by the GEMM and the silu-mul pass."""
    gen = torch.Generator().manual_seed(3)
    idx, m_sizes, gather = _routing(11, 5, 2, gen)
    x = torch.randn(11, 20, generator=gen)
    w = torch.randn(5, 2 * 9, 20, generator=gen)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    h, a = _block_ops.swiglu_gemm_impl(x, w, m_sizes, gather, 2, True, _ops.encode(SMALL))
    assert h.shape == (22, 18) and a.shape == (22, 9)
    assert torch.isfinite(h).all() and torch.isfinite(a).all()
    ref_h, ref_a = _swiglu_reference(x, w, m_sizes, gather, 2)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.double(), ref_a, rtol=1e-5, atol=1e-5)


def _all_rows(m):
    """m_sizes saying every one of the m rows was written (one expert)."""
    return torch.tensor([m], dtype=torch.int32)


def _combine_reference(y, weights, pos, topk):
    tokens = pos.shape[0] // topk
    rows = y.double()[pos.long()].view(tokens, topk, y.shape[1])
    return (rows * weights.double().view(tokens, topk, 1)).sum(1)


@pytest.mark.parametrize("tokens,topk,hidden", [(7, 2, 24), (5, 3, 700), (1, 1, 8),
                                                 (0, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_forward_and_backward(tokens, topk, hidden, dtype):
    gen = torch.Generator().manual_seed(tokens * 10 + topk)
    m = tokens * topk
    gather = torch.randperm(m, generator=gen).to(torch.int32)
    pos = _inverse(gather)
    assert torch.equal(pos[gather.long()], torch.arange(m, dtype=torch.int32))
    y = torch.randn(m, hidden, generator=gen).to(dtype).requires_grad_(True)
    weights = torch.rand(m, generator=gen).to(dtype).requires_grad_(True)
    out = _block_ops.combine(y, weights, pos, _all_rows(m), topk)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5,
                                                                        atol=1e-6)
    torch.testing.assert_close(out.double(), _combine_reference(y.detach(), weights.detach(),
                                                                pos, topk), **tol)
    d_out = torch.randn(tokens, hidden, generator=gen).to(dtype)
    gy, gwt = torch.autograd.grad(out, (y, weights), d_out)
    y64 = y.detach().double().requires_grad_(True)
    w64 = weights.detach().double().requires_grad_(True)
    ry, rw = torch.autograd.grad(_combine_reference(y64, w64, pos, topk), (y64, w64),
                                 d_out.double())
    torch.testing.assert_close(gy.double(), ry, **tol)
    torch.testing.assert_close(gwt.double(), rw, **tol)


def test_combine_backward_without_weight_gradient_writes_every_row(monkeypatch):
    """A frozen router (routing weights without gradient) takes the backward's other
    branch: dY must still be every row's weighted d_out (outputs poisoned)."""
    gen = torch.Generator().manual_seed(1)
    gather = torch.randperm(12, generator=gen).to(torch.int32)
    pos = _inverse(gather)
    y = torch.randn(12, 33, generator=gen, requires_grad=True)
    weights = torch.rand(12, generator=gen)  # no gradient wanted
    d_out = torch.randn(4, 33, generator=gen)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))
                        if k.get("dtype", torch.float32).is_floating_point else
                        real_empty(*a, **k))
    out = _block_ops.combine(y, weights, pos, _all_rows(12), 3)
    (gy,) = torch.autograd.grad(out, (y,), d_out)
    y64 = y.detach().double().requires_grad_(True)
    (ry,) = torch.autograd.grad(_combine_reference(y64, weights, pos, 3), (y64,),
                                d_out.double())
    torch.testing.assert_close(gy.double(), ry, rtol=1e-5, atol=1e-6)


def _block_weights(seed, t, e, h, i):
    """(generator, hidden [t, h], gate_up [e, 2i, h], down [e, h, i]), all requiring grad,
    drawn in this order from one seeded generator (callers draw routing from it next)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen, requires_grad=True)
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).requires_grad_(True)
    down = (torch.randn(e, h, i, generator=gen) / i**0.5).requires_grad_(True)
    return gen, hidden, gate_up, down


def test_block_fused_and_unfused_paths_agree():
    """SiLU passed as the module's act takes the fused gate; any other callable the unfused
    chunk/act/mul; for SiLU both must give the same block (values and gradients)."""
    t, e, k, h, i = 10, 4, 2, 24, 12
    gen, hidden, gate_up, down = _block_weights(4, t, e, h, i)
    idx = torch.topk(torch.randn(t, e, generator=gen), k, dim=-1).indices
    weights = torch.rand(t, k, generator=gen, requires_grad=True)
    inputs = (hidden, gate_up, down, weights)
    calls = []
    original = _block_ops.swiglu_gemm

    def spy(*a):
        calls.append(1)
        return original(*a)
    _block_ops.swiglu_gemm = spy
    try:
        fused = triton_gg.moe_experts(hidden, gate_up, down, idx, weights)
        assert calls, "the SiLU block did not take the fused path"
        unfused = triton_gg.moe_experts(hidden, gate_up, down, idx, weights,
                                        act=lambda g: torch.nn.functional.silu(g))
        assert len(calls) == 1
    finally:
        _block_ops.swiglu_gemm = original
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)
    d = torch.randn(t, h, generator=gen)
    for a, b in zip(torch.autograd.grad(fused, inputs, d), torch.autograd.grad(unfused, inputs,
                                                                               d)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", [torch.nn.functional.silu, torch.nn.functional.gelu],
                         ids=["fused_silu", "unfused_gelu"])
def test_block_compiles_fullgraph(act):
    torch._dynamo.reset()
    layer = triton_gg.MoEExperts(4, 16, 8, act=act)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 16, generator=gen, requires_grad=True)
    idx = torch.randint(0, 4, (6, 2), generator=gen)
    idx[1, 0], idx[4, 1] = 4, -1   # foreign slots: dropped on the traced path too
    weights = torch.rand(6, 2, generator=gen, requires_grad=True)
    eager = layer(hidden, idx, weights)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(hidden, idx, weights)
    torch.testing.assert_close(compiled, eager)
    params = (hidden, weights, layer.gate_up_proj, layer.down_proj)
    g1 = torch.autograd.grad(eager.sum(), params)
    g2 = torch.autograd.grad(compiled.sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def _layer_inputs(seed=6, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    layer = triton_gg.MoEExperts(4, 16, 8, dtype=dtype)
    hidden = torch.randn(6, 16, generator=gen).to(dtype).requires_grad_(True)
    idx = torch.randint(0, 4, (6, 2), generator=gen)
    weights = torch.rand(6, 2, generator=gen, requires_grad=True)   # fp32 router weights
    return layer, hidden, idx, weights


def test_checkpointing_and_retain_graph():
    """H is a saved tensor (non-reentrant checkpointing, the transformers default, recomputes
    it); the in-place dH makes a second backward through the same graph fail loudly."""
    from torch.utils.checkpoint import checkpoint
    layer, hidden, idx, weights = _layer_inputs()
    params = (hidden, weights, layer.gate_up_proj, layer.down_proj)
    plain = torch.autograd.grad(layer(hidden, idx, weights).sum(), params)
    ckpt_out = checkpoint(layer, hidden, idx, weights, use_reentrant=False)
    for a, b in zip(plain, torch.autograd.grad(ckpt_out.sum(), params)):
        torch.testing.assert_close(a, b)
    out = layer(hidden, idx, weights).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_router_weights_keep_their_dtype():
    """fp32 routing weights with bf16 experts: the weights' gradient comes back fp32."""
    layer, hidden, idx, weights = _layer_inputs(dtype=torch.bfloat16)
    out = layer(hidden, idx, weights)
    assert out.dtype == torch.bfloat16
    (g,) = torch.autograd.grad(out.float().sum(), (weights,))
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_combine_backward_with_strided_inputs():
    gen = torch.Generator().manual_seed(8)
    gather = torch.randperm(8, generator=gen).to(torch.int32)
    pos = _inverse(gather)
    base = torch.randn(24, 8, generator=gen)
    y = base.t().requires_grad_(True)            # [8, 24], not contiguous
    weights = torch.rand(8, generator=gen, requires_grad=True)
    d_out = torch.randn(4, 24, generator=gen)
    grads = torch.autograd.grad(_block_ops.combine(y, weights, pos, _all_rows(8), 2),
                                (y, weights), d_out)
    y64 = y.detach().double().requires_grad_(True)
    w64 = weights.detach().double().requires_grad_(True)
    ref = torch.autograd.grad(_combine_reference(y64, w64, pos, 2), (y64, w64), d_out.double())
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.double(), b)


def test_combine_skips_rows_past_the_routed_ones():
    """Rows at positions >= sum(m_sizes) (dropped slots: no GEMM wrote them) are never read:
    poisoned with NaN they change nothing, forward or backward."""
    gen = torch.Generator().manual_seed(9)
    tokens, topk, hidden = 6, 3, 40
    m = tokens * topk
    gather = torch.randperm(m, generator=gen).to(torch.int32)
    pos = _inverse(gather)
    m_sizes = torch.tensor([7, 0, 4], dtype=torch.int32)    # 11 rows written of 18
    dropped = pos >= 11
    y = torch.randn(m, hidden, generator=gen)
    y[11:] = float("nan")
    y.requires_grad_(True)
    weights = torch.rand(m, generator=gen)
    weights[dropped] = 0.0
    weights.requires_grad_(True)
    out = _block_ops.combine(y, weights, pos, m_sizes, topk)
    clean = torch.where(torch.arange(m)[:, None] < 11, y.detach(), 0.0)
    torch.testing.assert_close(out.double(), _combine_reference(clean, weights.detach(), pos,
                                                                topk))
    gy, gw = torch.autograd.grad(out, (y, weights), torch.randn(tokens, hidden, generator=gen))
    assert torch.isfinite(gy[:11]).all() and torch.isfinite(gw).all()
    assert torch.all(gw[dropped] == 0)


def _poison_rows_past(monkeypatch, valid: int, first_gemm: str) -> list:
    """NaN in every row past `valid` that the block's GEMMs leave unwritten (dropped
    slots): the first GEMM's outputs (`first_gemm`: swiglu_gemm_impl or gather_gemm_impl),
    the second GEMM's Y and both backward dX. Returns the list of sum(m_sizes) the first
    GEMM saw."""
    seen = []
    real_first, real_forward, real_dx = (getattr(_block_ops, first_gemm), _ops.forward_impl,
                                         _ops.dx_impl)

    def poisoned(rows):
        for r in rows:
            r[valid:] = float("nan")

    def first(x, w, m_sizes, gather, topk, permute_x, cfg):
        seen.append(int(m_sizes.sum()))
        out = real_first(x, w, m_sizes, gather, topk, permute_x, cfg)
        poisoned(out if isinstance(out, tuple) else (out,))
        return out

    def forward(*args):
        y_, y_unweighted = real_forward(*args)
        poisoned((y_,))
        return y_, y_unweighted

    def dx(*args):
        d = real_dx(*args)
        poisoned((d,))
        return d
    monkeypatch.setattr(_block_ops, first_gemm, first)
    monkeypatch.setattr(_ops, "forward_impl", forward)
    monkeypatch.setattr(_ops, "dx_impl", dx)
    return seen


def test_foreign_slots_are_dropped_on_the_fused_path(monkeypatch):
    """Ids outside [0, E) never reach a GEMM on the fused path (m_sizes counts only the
    others), the rows the GEMMs leave unwritten are never read (poisoned with NaN here),
    and the block matches the eager loop, gradients included."""
    from test_triton_moe import eager_experts as eager  # ids outside [0, E) match nothing
    t, e, k, h, i = 9, 4, 3, 24, 8
    gen, hidden, gate_up, down = _block_weights(12, t, e, h, i)
    idx = torch.topk(torch.randn(t, e, generator=gen), k, dim=-1).indices
    idx[::2, 0] = e
    idx[1, 1] = -1
    idx[4] = e + 3                                          # a token with no local expert
    weights = torch.softmax(torch.randn(t, k, generator=gen), -1).requires_grad_(True)
    inputs = (hidden, gate_up, down, weights)
    valid = int(((idx >= 0) & (idx < e)).sum())
    seen = _poison_rows_past(monkeypatch, valid, "swiglu_gemm_impl")
    ours = triton_gg.moe_experts(hidden, gate_up, down, idx, weights)
    assert seen == [valid]
    ref = eager(hidden, gate_up, down, idx, weights)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert torch.all(ours[4] == 0)
    d = torch.randn(t, h, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, inputs, d), torch.autograd.grad(ref, inputs, d)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_foreign_slots_with_non_finite_weights_contribute_nothing():
    """A dropped slot's routing weight is never read: NaN or Inf there (a router may leave
    anything in slots of other ranks' experts) must not reach the output or the gradients,
    on the fused path and with a down bias."""
    from test_triton_moe import eager_experts as eager  # ids outside [0, E) match nothing
    t, e, k, h, i = 6, 4, 2, 16, 8
    gen, hidden, gate_up, down = _block_weights(5, t, e, h, i)
    idx = torch.topk(torch.randn(t, e, generator=gen), k, dim=-1).indices
    idx[0, 0], idx[3, 1] = -1, e
    weights = torch.softmax(torch.randn(t, k, generator=gen), -1)
    weights[0, 0], weights[3, 1] = float("nan"), float("inf")
    weights.requires_grad_(True)
    ref = eager(hidden, gate_up, down, idx, weights)
    assert torch.isfinite(ref).all()
    for kwargs in ({}, {"down_bias": torch.zeros(e, h)}):
        out = triton_gg.moe_experts(hidden, gate_up, down, idx, weights, **kwargs)
        assert torch.isfinite(out).all(), kwargs
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        grads = torch.autograd.grad(out.sum(), (hidden, gate_up, down, weights))
        assert all(torch.isfinite(g).all() for g in grads), kwargs
        assert grads[3][0, 0] == 0 and grads[3][3, 1] == 0


def test_foreign_slots_are_dropped_on_the_unfused_path(monkeypatch):
    """With a model's own activation and biases on both GEMMs (the unfused path: gpt-oss,
    Nemotron-H), slots of other ranks' experts never reach a GEMM either: rows past
    sum(m_sizes) stay unwritten (poisoned with NaN here) through the activation and the
    backward, and the block matches an eager loop, every gradient included."""
    t, e, k, h, i = 9, 4, 3, 24, 8
    act = torch.nn.functional.gelu
    gen, hidden, gate_up, down = _block_weights(21, t, e, h, i)
    b1 = torch.randn(e, 2 * i, generator=gen).requires_grad_(True)
    b2 = torch.randn(e, h, generator=gen).requires_grad_(True)
    idx = torch.topk(torch.randn(t, e, generator=gen), k, dim=-1).indices
    idx[::2, 0] = e
    idx[1, 1] = -1
    idx[4] = e + 3                                          # a token with no local expert
    weights = torch.softmax(torch.randn(t, k, generator=gen), -1).requires_grad_(True)
    inputs = (hidden, gate_up, down, b1, b2, weights)
    valid = int(((idx >= 0) & (idx < e)).sum())

    def eager():
        out = hidden * 0.0
        for ex in range(e):
            token, slot = torch.nonzero(idx == ex, as_tuple=True)
            if token.numel():
                gate, up = (hidden[token] @ gate_up[ex].T + b1[ex]).chunk(2, dim=-1)
                y = (act(gate) * up) @ down[ex].T + b2[ex]
                out = out.index_add(0, token, y * weights[token, slot, None])
        return out

    seen = _poison_rows_past(monkeypatch, valid, "gather_gemm_impl")
    ours = triton_gg.moe_experts(hidden, gate_up, down, idx, weights, gate_up_bias=b1,
                                 down_bias=b2, act=act)
    assert seen == [valid]
    ref = eager()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    d = torch.randn(t, h, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, inputs, d), torch.autograd.grad(ref, inputs, d)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_silu_mul_leaves_rows_past_the_routed_ones():
    """Rows past sum(m_sizes) (dropped slots) are neither read nor written."""
    from triton_gg.kernels.silu_mul import launch_silu_mul
    h = torch.randn(40, 16)
    h[25:] = float("nan")  # a read of these rows would put NaN into the routed ones too
    a = torch.full((40, 8), float("nan"))
    launch_silu_mul(h, a, torch.tensor([5, 0, 20], dtype=torch.int32))
    assert torch.isfinite(a[:25]).all() and torch.isnan(a[25:]).all()


@pytest.mark.parametrize("rows,inter", [(1, 8), (37, 48), (70, 200)])
def test_silu_mul_matches_the_fused_epilogue_math(rows, inter):
    """silu_mul forms A from the stored H: fp32 inside, one rounding; every routed row and
    column written (output poisoned first)."""
    from triton_gg.kernels.silu_mul import launch_silu_mul
    gen = torch.Generator().manual_seed(rows * 1000 + inter)
    h = torch.randn(rows, 2 * inter, generator=gen).to(torch.bfloat16)
    a = torch.full((rows, inter), float("nan"), dtype=torch.bfloat16)
    launch_silu_mul(h, a, torch.tensor([rows], dtype=torch.int32))
    gate, up = h.float().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up  # fp32; A may differ by one bf16 rounding
    torch.testing.assert_close(a.float(), expected, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("in_place", [False, True])
def test_swiglu_backward_covers_only_the_routed_rows(in_place):
    """dH of A = silu(gate) * up against autograd on the routed rows (rows 0..24 of 40, odd
    widths), every such row and column written; rows past sum(m_sizes) (dropped slots,
    which no GEMM reads) left as they were, also when dH overwrites H."""
    from triton_gg.kernels.swiglu_backward import launch_swiglu_backward
    gen = torch.Generator().manual_seed(7)
    inter, routed = 37, 25
    h = torch.randn(40, 2 * inter, generator=gen)
    da = torch.randn(40, inter, generator=gen)
    leaf = h[:routed].clone().requires_grad_(True)
    gate, up = leaf.chunk(2, dim=-1)
    expected, = torch.autograd.grad(torch.nn.functional.silu(gate) * up, leaf, da[:routed])
    before = h.clone()
    dh = h if in_place else torch.full_like(h, float("nan"))
    launch_swiglu_backward(h, da, dh, torch.tensor([5, 0, 20], dtype=torch.int32))
    torch.testing.assert_close(dh[:routed], expected, rtol=1e-5, atol=1e-6)
    untouched = before[routed:] if in_place else torch.full_like(before[routed:], float("nan"))
    torch.testing.assert_close(dh[routed:], untouched, equal_nan=True, rtol=0, atol=0)


def test_elementwise_passes_stop_at_m_when_m_sizes_overcount():
    """m_sizes summing past M (possible with value checks off) must not take silu_mul or
    the SwiGLU backward past row M: the tensors are views of longer poisoned buffers, whose
    rows past M must stay untouched."""
    from triton_gg.kernels.silu_mul import launch_silu_mul
    from triton_gg.kernels.swiglu_backward import launch_swiglu_backward
    rows, inter = 40, 24
    overcount = torch.tensor([30, 30], dtype=torch.int32)  # 60 > 40
    h_buf = torch.randn(64, 2 * inter)
    a_buf = torch.full((64, inter), float("nan"))
    launch_silu_mul(h_buf[:rows], a_buf[:rows], overcount)
    assert torch.isfinite(a_buf[:rows]).all() and torch.isnan(a_buf[rows:]).all()
    dh_buf = torch.full((64, 2 * inter), float("nan"))
    launch_swiglu_backward(h_buf[:rows], torch.randn(rows, inter), dh_buf[:rows], overcount)
    assert torch.isfinite(dh_buf[:rows]).all() and torch.isnan(dh_buf[rows:]).all()
