"""The MoE expert block on triton_gg's kernels, in the Hugging Face weight layout.

    hidden [T, H] --gather (permute_x)--> gate_up_proj [E, 2I, H] --> act(gate) * up [M, I]
                  --> down_proj [E, H, I], scatter (permute_y), routing weight (fuse_mul_post)
                  --> sum over each token's k rows --> [T, H]

Routing runs on the device (no host sync); every step is differentiable (hidden, both weight
tensors and the routing weights get gradients). Groundwork for the Hugging Face experts
integration (not registered with transformers yet).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from triton_gg.api import grouped_gemm
from triton_gg.routing import route


def moe_experts(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                act: Callable[[torch.Tensor], torch.Tensor] = nn.functional.silu,
                autotune: bool = False) -> torch.Tensor:
    """out [T, H] = sum_j top_k_weights[t, j] * down[e_j](act(gate[e_j] x_t) * up[e_j] x_t).

    hidden [T, H]; gate_up_proj [E, 2I, H] (gate rows first, then up, as Hugging Face stores
    them); down_proj [E, H, I]; top_k_index [T, k] int; top_k_weights [T, k].
    """
    if hidden.ndim != 2 or top_k_index.ndim != 2 or top_k_index.shape != top_k_weights.shape:
        raise ValueError(f"expected hidden [T, H], top_k_index and top_k_weights [T, k]; got "
                         f"{tuple(hidden.shape)}, {tuple(top_k_index.shape)}, "
                         f"{tuple(top_k_weights.shape)}")
    if top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(f"top_k_index has {top_k_index.shape[0]} tokens, hidden "
                         f"{hidden.shape[0]}")
    if gate_up_proj.ndim != 3 or down_proj.ndim != 3 or gate_up_proj.shape[1] % 2:
        raise ValueError(f"expected gate_up_proj [E, 2I, H] and down_proj [E, H, I]; got "
                         f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    if down_proj.shape[2] * 2 != gate_up_proj.shape[1]:
        raise ValueError(f"down_proj {tuple(down_proj.shape)} takes I={down_proj.shape[2]} "
                         f"but gate_up_proj {tuple(gate_up_proj.shape)} makes "
                         f"I={gate_up_proj.shape[1] // 2}")
    tokens, topk = top_k_index.shape
    num_experts = gate_up_proj.shape[0]
    m_sizes, gather = route(top_k_index, num_experts)
    h = grouped_gemm(hidden, gate_up_proj, m_sizes, gather, topk, permute_x=True,
                     autotune=autotune)                                   # [M, 2I]
    gate, up = h.chunk(2, dim=-1)
    a = act(gate) * up                                                    # [M, I]
    y = grouped_gemm(a, down_proj, m_sizes, gather, topk, permute_y=True,
                     topk_weights=top_k_weights.reshape(-1).to(hidden.dtype),
                     fuse_mul_post=True, autotune=autotune)               # [T*k, H]
    return y.view(tokens, topk, down_proj.shape[1]).sum(dim=1)


class MoEExperts(nn.Module):
    """Experts of an MoE MLP with the Hugging Face layout (``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``) running on triton_gg."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *,
                 act: Callable[[torch.Tensor], torch.Tensor] = nn.functional.silu,
                 device=None, dtype=None):
        super().__init__()
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
