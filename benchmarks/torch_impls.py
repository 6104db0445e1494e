"""The PyTorch implementations: dense ceiling, torch._grouped_mm, triton_gg with the library's
defaults (and, labelled, with autotune=True)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from benchmarks.problems import Problem, draw

Bench = tuple[str, str, Callable[[], object]]  # (impl, op, call)


class TorchInputs:
    def __init__(self, problem: Problem, device: str = "cuda"):
        r = problem.routing
        self.x_tokens = draw(problem, "x_tokens", device)
        self.x = draw(problem, "x", device)
        self.w = draw(problem, "w", device)
        self.dy = draw(problem, "dy", device)
        self.dense_b = draw(problem, "dense_b", device)
        self.m_sizes = torch.from_numpy(r.m_sizes).to(device)
        self.gather = torch.from_numpy(r.gather_indices).to(device)
        self.topk_weights = torch.from_numpy(r.topk_weights).to(device, torch.bfloat16)
        self.offs = torch.cumsum(self.m_sizes, 0).to(torch.int32)
        self.topk = problem.shape.topk


def _backward_call(make_out: Callable[[], torch.Tensor], inputs: tuple, dy: torch.Tensor):
    """Time only the backward: the graph is built once and kept."""
    out = make_out()
    return lambda: torch.autograd.grad(out, inputs, dy, retain_graph=True)


def dense(inp: TorchInputs) -> Iterator[Bench]:
    yield "dense", "fwd", lambda: torch.mm(inp.x, inp.dense_b)


def torch_grouped_mm(inp: TorchInputs) -> Iterator[Bench]:
    if not hasattr(torch, "_grouped_mm"):
        return
    w_t = inp.w.transpose(1, 2)  # [E, K, N] view, as a user of _grouped_mm would pass it
    yield "torch_grouped_mm", "fwd", lambda: torch._grouped_mm(inp.x, w_t, offs=inp.offs)
    x = inp.x.detach().requires_grad_(True)
    w = inp.w.detach().requires_grad_(True)
    yield "torch_grouped_mm", "bwd", _backward_call(
        lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=inp.offs), (x, w), inp.dy)


def triton_gg_impls(inp: TorchInputs, first_gemm: bool) -> Iterator[Bench]:
    """triton_gg as a user calls it: the library's defaults (no autotune flag, no
    set_value_checks call; the shipped tuned configs where the card and shape have them)."""
    import triton_gg
    routing = (inp.m_sizes, inp.gather, inp.topk)
    yield "triton_gg", "fwd", lambda: triton_gg.grouped_gemm_forward(inp.x, inp.w, *routing)
    if first_gemm:
        yield "triton_gg_permute_x", "fwd", lambda: triton_gg.grouped_gemm_forward(
            inp.x_tokens, inp.w, *routing, permute_x=True)
    else:
        yield "triton_gg_permute_y", "fwd", lambda: triton_gg.grouped_gemm_forward(
            inp.x, inp.w, *routing, permute_y=True)
    yield "triton_gg", "dX", lambda: triton_gg.grouped_gemm_dX(inp.dy, inp.w, *routing)
    yield "triton_gg", "dW", lambda: triton_gg.grouped_gemm_dW(inp.x, inp.dy, *routing)
    x = inp.x.detach().requires_grad_(True)
    w = inp.w.detach().requires_grad_(True)
    yield "triton_gg", "bwd", _backward_call(
        lambda: triton_gg.grouped_gemm(x, w, *routing), (x, w), inp.dy)
    # the drop-in, with torch._grouped_mm's own arguments (b an [E, K, N] view of W)
    w_t = inp.w.transpose(1, 2)
    yield "triton_gg_grouped_mm", "fwd", lambda: triton_gg.grouped_mm(inp.x, w_t, inp.offs)
    yield "triton_gg_grouped_mm", "bwd", _backward_call(
        lambda: triton_gg.grouped_mm(x, w.transpose(1, 2), inp.offs), (x, w), inp.dy)


def triton_gg_autotuned(inp: TorchInputs) -> Iterator[Bench]:
    """Non-default: ``autotune=True`` (labelled so in the rows)."""
    import triton_gg
    routing = (inp.m_sizes, inp.gather, inp.topk)
    yield "triton_gg_autotune", "fwd", lambda: triton_gg.grouped_gemm_forward(
        inp.x, inp.w, *routing, autotune=True)
    yield "triton_gg_autotune", "dX", lambda: triton_gg.grouped_gemm_dX(
        inp.dy, inp.w, *routing, autotune=True)
    yield "triton_gg_autotune", "dW", lambda: triton_gg.grouped_gemm_dW(
        inp.x, inp.dy, *routing, autotune=True)


def triton_gg_value_checks(inp: TorchInputs, first_gemm: bool) -> Iterator[Bench]:
    """Non-default: the forward with the opt-in value checks on (a host read per call):
    what the debugging aid costs."""
    import triton_gg
    routing = (inp.m_sizes, inp.gather, inp.topk)

    def checked(fn):
        def run():
            with triton_gg.value_checks():
                return fn()
        return run
    yield "triton_gg_value_checks", "fwd", checked(
        lambda: triton_gg.grouped_gemm_forward(inp.x, inp.w, *routing))
    if first_gemm:
        yield "triton_gg_value_checks_permute_x", "fwd", checked(
            lambda: triton_gg.grouped_gemm_forward(inp.x_tokens, inp.w, *routing,
                                                   permute_x=True))


def all_torch(problem: Problem, inp: TorchInputs, impls: set[str]) -> Iterator[Bench]:
    if "dense" in impls:
        yield from dense(inp)
    if "torch_grouped_mm" in impls:
        yield from torch_grouped_mm(inp)
    if impls & {"triton_gg", "triton_gg_permute_x", "triton_gg_permute_y",
                 "triton_gg_grouped_mm"}:
        for bench in triton_gg_impls(inp, problem.shape.is_first_gemm):
            if bench[0] in impls or bench[0].startswith("triton_gg") and "triton_gg" in impls:
                yield bench
    if "triton_gg_autotune" in impls:
        yield from triton_gg_autotuned(inp)
    if "triton_gg_value_checks" in impls:
        yield from triton_gg_value_checks(inp, problem.shape.is_first_gemm)
