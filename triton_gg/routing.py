"""Routing on the device: (m_sizes, gather_indices) from topk_ids without a host sync."""

from __future__ import annotations

import torch

from gg_spec import checks


def route(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m_sizes int32 [E] (rows per expert) and gather_indices int32 [M] (stable argsort of
    topk_ids.ravel(): the routed row at each expert-order position), on topk_ids' device.

    Out-of-range expert ids are not checked here (that would need a host sync): ids outside
    [0, num_experts) count for no expert and their rows sort after every expert's, so
    sum(m_sizes) < M (the GEMMs' value check refuses that; the MoE blocks use it to drop
    other ranks' slots)."""
    checks.check_topk_ids(tuple(topk_ids.shape), str(topk_ids.dtype).replace("torch.", ""),
                          num_experts)
    flat = topk_ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < num_experts)
    # ids outside [0, E) count for no expert and sort after every expert's rows
    flat = torch.where(valid, flat, torch.full_like(flat, num_experts))
    m_sizes = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_ids.device)
    m_sizes.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    m_sizes = m_sizes[:num_experts]
    gather_indices = torch.sort(flat, stable=True).indices.to(torch.int32)
    return m_sizes, gather_indices
