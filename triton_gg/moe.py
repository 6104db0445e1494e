"""The MoE expert block on triton_gg's kernels, in the Hugging Face weight layout.

    hidden [T, H] --gather (permute_x)--> gate_up_proj [E, 2I, H] (+ bias) --> act(gate) * up
                  [M, I] --> down_proj [E, H, I], scatter (permute_y), routing weight
                  (fuse_mul_post) --> sum over each token's k rows (+ weighted bias) --> [T, H]

Routing runs on the device and nothing reads the device from the host: the routing tensors
are built here by ``route`` (right by construction), so the GEMMs' value checks, a host sync
each, are skipped. Every step is differentiable (hidden, both weight tensors, the biases and
the routing weights get gradients).

Slots whose expert id lies outside [0, E) contribute nothing (the convention of transformers'
expert parallelism, whose dispatcher marks tokens of other ranks' experts with such ids): they
are dropped (routed past sum(m_sizes): no GEMM computes or reads their rows, the combine
passes skip them and never read their routing weights), so an expert-parallel rank's GEMMs
run only its own experts' rows, with the fused SiLU gate and with a model's own gate or a
first-GEMM bias alike (the elementwise passes, the activation's backward and dW's gathered
copy of X still cover all T*k rows). No host check.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from gg_spec import checks
from gg_spec.checks import routing_trusted
from triton_gg import _block_ops, _ops, api
from triton_gg import autotune as autotune_cache
from triton_gg import _validate as v
from triton_gg.api import grouped_gemm
from triton_gg.routing import route_with_positions


def _fail(msg: str):
    raise ValueError(msg)


def _check_block(hidden, w1, w2, top_k_index, top_k_weights, b1, b2, names):
    """Shapes of one expert block: hidden [T, H], w1 [E, N1, H], w2 [E, H, I],
    top_k_index / top_k_weights [T, k], b1 [E, N1], b2 [E, H]."""
    w1_name, w2_name = names
    # the biases by their weights' names (moe_experts calls them gate_up_bias / down_bias,
    # Hugging Face modules gate_up_proj_bias / up_proj_bias / down_proj_bias)
    b1_name, b2_name = f"{w1_name} bias", f"{w2_name} bias"
    args = {"hidden": hidden, w1_name: w1, w2_name: w2, "top_k_index": top_k_index,
            "top_k_weights": top_k_weights, b1_name: b1, b2_name: b2}
    checks.check_devices(**{name: v.describe(t, name) for name, t in args.items()})
    if not hidden.is_floating_point() or not top_k_weights.is_floating_point():
        _fail(f"hidden and top_k_weights must be floating point, got {hidden.dtype} and "
              f"{top_k_weights.dtype}")
    if hidden.ndim != 2 or top_k_index.ndim != 2 or top_k_index.shape != top_k_weights.shape:
        _fail(f"expected hidden [T, H], top_k_index and top_k_weights [T, k]; got "
              f"{tuple(hidden.shape)}, {tuple(top_k_index.shape)}, "
              f"{tuple(top_k_weights.shape)}")
    if top_k_index.shape[0] != hidden.shape[0]:
        _fail(f"top_k_index {tuple(top_k_index.shape)} has {top_k_index.shape[0]} tokens, "
              f"hidden {tuple(hidden.shape)} has {hidden.shape[0]}")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        _fail(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")
    if w1.ndim != 3 or w2.ndim != 3:
        _fail(f"expected {w1_name} [E, N, H] and {w2_name} [E, H, I]; got "
              f"{tuple(w1.shape)} and {tuple(w2.shape)}")
    if w1.shape[2] != hidden.shape[1] or w2.shape[1] != hidden.shape[1]:
        _fail(f"{w1_name} {tuple(w1.shape)} and {w2_name} {tuple(w2.shape)} must both take "
              f"H={hidden.shape[1]} of hidden {tuple(hidden.shape)}")
    if w1.shape[0] != w2.shape[0]:
        _fail(f"{w1_name} {tuple(w1.shape)} and {w2_name} {tuple(w2.shape)} disagree on the "
              f"number of experts")
    for name, bias, want in ((b1_name, b1, (w1.shape[0], w1.shape[1])),
                             (b2_name, b2, (w2.shape[0], w2.shape[1]))):
        if bias is not None and tuple(bias.shape) != want:
            _fail(f"{name} must be [E, N] = {want}, got {tuple(bias.shape)}")


def _mask_foreign_slots(top_k_index, top_k_weights, num_experts):
    """Ids outside [0, E) get routing weight 0 and the id E (``route`` leaves them out of
    m_sizes and sorts them last, so no GEMM computes them)."""
    valid = (top_k_index >= 0) & (top_k_index < num_experts)
    index = torch.where(valid, top_k_index, torch.full_like(top_k_index, num_experts))
    weights = torch.where(valid, top_k_weights, torch.zeros_like(top_k_weights))
    return index, weights


_inverse = _block_ops.inverse_permutation


def _bias_rows(b1, index, gather, num_experts):
    """b1 [E, N] of the expert of each expert-order position (the sorted ids); zeros at the
    positions of dropped slots, so their (unwritten) rows put no gradient into b1."""
    ids = index.reshape(-1)[gather.long()]
    own = (ids >= 0) & (ids < num_experts)
    rows = b1[ids.clamp(0, num_experts - 1)]
    return torch.where(own[:, None], rows, torch.zeros((), dtype=b1.dtype, device=b1.device))


def _first_gemm_configs(x, w1, m_sizes, gather, topk, autotune):
    """Forward / dX / dW configs of the first GEMM (permute_x), tuned (autotune) or
    default."""
    dims = v.check_forward(x, w1, m_sizes, gather, topk, permute_x=True, permute_y=False,
                           topk_weights=None, fuse_mul_post=False, config=None)
    dx_cfg = dw_cfg = None
    # the SiLU gate runs after the GEMM (its own pass): the same forward config either way
    forward_cfg = api._forward_config(None, autotune, dims, x, w1, m_sizes, gather, topk,
                                      True, False, None, False)
    if autotune:
        dx_cfg, dw_cfg = _unfused_backward_configs(dims, x, w1, m_sizes, gather, topk)
    dx_key, dw_key = _backward_keys(dims, x)
    return [_ops.encode(c) for c in (forward_cfg,
                                     dx_cfg or autotune_cache.lookup(dx_key),
                                     dw_cfg or autotune_cache.lookup(dw_key))]


def _backward_keys(dims, x):
    """Tuning keys of the first GEMM's dX and dW as they run (see
    ``_unfused_backward_configs``)."""
    plain = dict(permute_x=False, permute_y=False)
    dw_flags = plain if _ops.dw_gathers_x(x) else dict(permute_x=True, permute_y=False)
    return (autotune_cache.key_for("dX", dims, x.dtype, x.device, **plain),
            autotune_cache.key_for("dW", dims, x.dtype, x.device, **dw_flags))


def _unfused_backward_configs(dims, x, w1, m_sizes, gather, topk):
    """dX and dW configs of the first GEMM's backward. dX runs in expert order (the combine
    pass sums each token's rows), and on a GPU dW runs on a gathered copy of X
    (``_ops.dw_with_gather``), both without the permute_x fusion: their keys are then the
    unfused ones, and a key not yet tuned is tuned here on random operands of the unfused
    shapes (values do not change the speed), not borrowed from the permute_x key (whose
    tile ran 18% slower unfused, benchmarks/NOTES.md step 14)."""
    dx_key, dw_key = _backward_keys(dims, x)
    dx_cfg = autotune_cache.cached(dx_key)
    dw_cfg = autotune_cache.cached(dw_key)
    if (dx_cfg and dw_cfg) or not x.is_cuda or torch.compiler.is_compiling():
        return dx_cfg, dw_cfg
    dy = api.tuning_probe((dims.m, dims.n), x)
    if dx_cfg is None:
        dx_cfg = api._dx_config(None, True, dims, dy, w1, m_sizes, gather, topk, False, False)
    if dw_cfg is None:
        rows = api.tuning_probe((dims.m, dims.k), x)
        dw_cfg = api._dw_config(None, True, dims, rows, dy, m_sizes, gather, topk, False,
                                False)
    return dx_cfg, dw_cfg


def expert_block(hidden: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 mid: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 b1: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                 autotune: bool = False, names=("w1", "w2")) -> torch.Tensor:
    """out [T, H] = sum_j top_k_weights[t, j] * (w2[e_j] mid(w1[e_j] x_t + b1[e_j]) + b2[e_j]).

    The general block behind ``moe_experts`` and the transformers integration: w1 [E, N1, H]
    and w2 [E, H, I] in ``nn.Linear`` layout (any strides: transposed views are not copied),
    ``mid`` maps the first GEMM's rows [M, N1] to [M, I] (a model's own gate, or a plain
    activation); None is SiLU-gating of concatenated [gate | up] rows, one fused pass after
    the first GEMM (forward and backward). The second GEMM writes its rows once, in expert
    order; the routing weights and the top-k sum are applied by one combine pass (whose backward forms dY and
    the routing weights' gradient together). The result has hidden's dtype; the GEMMs run
    in w1's dtype.
    """
    _check_block(hidden, w1, w2, top_k_index, top_k_weights, b1, b2, names)
    tokens, topk = top_k_index.shape
    num_experts = w1.shape[0]
    x = hidden.to(w1.dtype)
    fused_gate = mid is None and b1 is None
    # routing weights keep their dtype (fp32 from most routers): combine reads them in fp32.
    # Foreign slots are dropped: route counts their ids for no expert and sorts them past
    # sum(m_sizes); no GEMM writes or reads those rows, the combine passes skip them (their
    # weight's gradient is 0) and the first GEMM's dX is summed per token by the combine
    # pass too. Only the down bias, which rides the routing weights, needs them masked.
    if b2 is None:
        index, weights = top_k_index, top_k_weights
    else:
        index, weights = _mask_foreign_slots(top_k_index, top_k_weights, num_experts)
    if mid is None and not fused_gate:
        mid = silu_gate()
    if fused_gate and w1.shape[1] != 2 * w2.shape[2]:
        _fail(f"{names[0]} {tuple(w1.shape)} must hold [gate; up] rows, 2 x the "
              f"I={w2.shape[2]} of {names[1]} {tuple(w2.shape)}")
    with routing_trusted():
        m_sizes, gather, pos = route_with_positions(index, num_experts)
        if fused_gate:
            a = _block_ops.swiglu_gemm(
                x, w1, m_sizes, gather, topk, True,
                *_first_gemm_configs(x, w1, m_sizes, gather, topk, autotune),
                pos)                                                          # [M, I]
        else:
            # rows past sum(m_sizes) (dropped slots) stay unwritten through mid: nothing
            # downstream reads them
            h = _block_ops.gather_gemm(
                x, w1, m_sizes, gather, topk, True,
                *_first_gemm_configs(x, w1, m_sizes, gather, topk, autotune),
                pos)                                                          # [M, N1]
            if b1 is not None:
                h = h + _bias_rows(b1.to(h.dtype), index, gather, num_experts)
            a = mid(h)                                                        # [M, I]
        if a.ndim != 2 or a.shape[0] != gather.shape[0] or a.shape[1] != w2.shape[2]:
            _fail(f"the activation/gate gives {tuple(a.shape)} rows, but {names[1]} "
                  f"{tuple(w2.shape)} takes [{gather.shape[0]}, {w2.shape[2]}]")
        y = grouped_gemm(a.to(w2.dtype), w2, m_sizes, gather, topk,
                         autotune=autotune)                   # [M, H], expert order
    out = _block_ops.combine(y, weights.reshape(-1), pos, m_sizes, topk)
    if b2 is not None:  # sum_j w_j * b2[e_j]: the bias rides the routing weight too
        b2_rows = b2.to(weights.dtype)[index.clamp(max=num_experts - 1)]   # dropped: weight 0
        out = out + torch.einsum("tk,tkh->th", weights, b2_rows)
    return out.to(hidden.dtype)


def silu_gate(act: Callable[[torch.Tensor], torch.Tensor] = nn.functional.silu):
    """The gated MLP middle on concatenated [gate | up] rows, unfused: act(gate) * up."""
    def mid(h):
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return mid


def moe_experts(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                gate_up_bias: torch.Tensor | None = None,
                down_bias: torch.Tensor | None = None,
                act: Callable[[torch.Tensor], torch.Tensor] = nn.functional.silu,
                autotune: bool = False) -> torch.Tensor:
    """out [T, H] = sum_j top_k_weights[t, j] * down[e_j](act(gate[e_j] x_t) * up[e_j] x_t).

    hidden [T, H]; gate_up_proj [E, 2I, H] (gate rows first, then up, as Hugging Face stores
    them); down_proj [E, H, I]; top_k_index [T, k] int; top_k_weights [T, k]; optional
    gate_up_bias [E, 2I] and down_bias [E, H]. Slots with an expert id outside [0, E)
    contribute nothing. Runs without a host sync.
    """
    if gate_up_proj.ndim == 3 and gate_up_proj.shape[1] % 2:
        _fail(f"gate_up_proj {tuple(gate_up_proj.shape)} must be [E, 2I, H] (even rows)")
    if (gate_up_proj.ndim == 3 and down_proj.ndim == 3
            and down_proj.shape[2] * 2 != gate_up_proj.shape[1]):
        _fail(f"down_proj {tuple(down_proj.shape)} takes I={down_proj.shape[2]} but "
              f"gate_up_proj {tuple(gate_up_proj.shape)} makes I={gate_up_proj.shape[1] // 2}")
    mid = None if act is nn.functional.silu else silu_gate(act)  # None: fused SiLU-gate
    return expert_block(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights, mid,
                        b1=gate_up_bias, b2=down_bias, autotune=autotune,
                        names=("gate_up_proj", "down_proj"))


class MoEExperts(nn.Module):
    """Experts of an MoE MLP with the Hugging Face layout (``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``) running on triton_gg. forward(hidden [T, H],
    top_k_index [T, k], top_k_weights [T, k]) -> [T, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *,
                 act: Callable[[torch.Tensor], torch.Tensor] = nn.functional.silu,
                 device=None, dtype=None):
        super().__init__()
        checks.check_layer_sizes(num_experts=num_experts, hidden_size=hidden_size,
                                 intermediate_size=intermediate_size)
        kw = dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, **kw))
        self.act = act
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return moe_experts(hidden, self.gate_up_proj, self.down_proj, top_k_index,
                           top_k_weights, act=self.act)
