"""Routing on the device: (m_sizes, gather_indices[, positions]) from topk_ids without a host
sync, in three Triton launches (triton_gg/kernels/route.py)."""

from __future__ import annotations

import torch

from gg_spec import checks
from triton_gg._runtime import INTERPRETING
from triton_gg.kernels.route import MAX_BINS, launch_route


def _route_torch(topk_ids: torch.Tensor, num_experts: int):
    """The same routing in torch ops (~20 small kernels): for expert counts past the
    kernels' register budget (num_experts > MAX_BINS = 4096) and devices the kernels do not
    run on in this process (CPU tensors beside a GPU, where Triton compiles for the GPU)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    valid = (flat >= 0) & (flat < num_experts)
    flat = torch.where(valid, flat, torch.full_like(flat, num_experts))
    m_sizes = torch.zeros(num_experts + 1, dtype=torch.int32, device=topk_ids.device)
    m_sizes.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    gather = torch.sort(flat, stable=True).indices
    pos = torch.empty_like(gather)
    pos[gather] = torch.arange(gather.shape[0], device=gather.device)
    return m_sizes[:num_experts], gather.to(torch.int32), pos.to(torch.int32)


def route_with_positions(topk_ids: torch.Tensor, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``route``'s (m_sizes, gather_indices) and positions int32 [M], the inverse
    permutation: positions[gather_indices[p]] = p, i.e. the expert-order position of each
    routed row (what the top-k combine reads)."""
    checks.check_topk_ids(tuple(topk_ids.shape), str(topk_ids.dtype).replace("torch.", ""),
                          num_experts)
    # the op only where torch.compile traces: its dispatch costs ~25 us of host time
    if torch.compiler.is_compiling():
        return route_op(topk_ids, num_experts)
    return _route_impl(topk_ids, num_experts)


def _route_impl(topk_ids: torch.Tensor, num_experts: int):
    """The kernels, or torch ops where they cannot run (_route_torch)."""
    kernels_run_here = topk_ids.device.type == ("cpu" if INTERPRETING else "cuda")
    if num_experts > MAX_BINS or not kernels_run_here:
        return _route_torch(topk_ids, num_experts)
    return launch_route(topk_ids, num_experts)


@torch.library.custom_op("triton_gg::route", mutates_args=())
def route_op(topk_ids: torch.Tensor, num_experts: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m_sizes, gather_indices, positions): an op, so torch.compile traces over the
    kernels (static output shapes: [E], [M], [M])."""
    return _route_impl(topk_ids, num_experts)


@route_op.register_fake
def _(topk_ids, num_experts):
    rows = topk_ids.numel()
    return (topk_ids.new_empty((num_experts,), dtype=torch.int32),
            topk_ids.new_empty((rows,), dtype=torch.int32),
            topk_ids.new_empty((rows,), dtype=torch.int32))


def route(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m_sizes int32 [E] (rows per expert) and gather_indices int32 [M] (stable argsort of
    topk_ids.ravel(): the routed row at each expert-order position), on topk_ids' device.

    Out-of-range expert ids are not checked here (that would need a host sync): ids outside
    [0, num_experts) count for no expert and their rows sort after every expert's, so
    sum(m_sizes) < M (the GEMMs' value check refuses that; the MoE blocks use it to drop
    other ranks' slots)."""
    m_sizes, gather_indices, _ = route_with_positions(topk_ids, num_experts)
    return m_sizes, gather_indices
