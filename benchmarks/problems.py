"""One benchmark problem: a GEMM shape at a token count, its inputs drawn once (numpy, so
torch and JAX see the same numbers), and its FLOP and byte floors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import gg_spec
from gg_spec.presets import GemmShape


@dataclass
class Problem:
    shape: GemmShape
    tokens: int
    routing: gg_spec.Routing
    seed: int = 0

    @property
    def m(self) -> int:
        return self.tokens * self.shape.topk

    @property
    def flops(self) -> int:
        """2·M·N·K: one GEMM (forward, dX or dW)."""
        return 2 * self.m * self.shape.n * self.shape.k

    def bytes_floor(self, itemsize: int = 2) -> int:
        """Each operand read once and the output written once (forward)."""
        s = self.shape
        return itemsize * (self.m * s.k + s.num_experts * s.n * s.k + self.m * s.n)


def make_problem(shape_name: str, tokens: int, seed: int = 0) -> Problem:
    shape = gg_spec.get_shape(shape_name)
    rng = np.random.default_rng(seed)
    # softmax top-k of random logits: roughly balanced (ANCHORS.md)
    routing = gg_spec.make_routing("random", tokens, shape.num_experts, shape.topk, rng)
    return Problem(shape, tokens, routing, seed)


_OPERANDS = ("x_tokens", "x", "w", "dy", "dense_b")


def draw(problem: Problem, what: str, device: str = "cuda"):
    """A bf16 torch tensor drawn on the device (host RNG would take minutes at these sizes;
    JAX receives the same buffers through DLPack): x_tokens [T,K], x [M,K], w [E,N,K],
    dy [M,N], dense_b [K,N]. Random normal, weights scaled by 1/sqrt(K); never zeros."""
    import torch
    s = problem.shape
    shapes = {"x_tokens": (problem.tokens, s.k), "x": (problem.m, s.k),
              "w": (s.num_experts, s.n, s.k), "dy": (problem.m, s.n), "dense_b": (s.k, s.n)}
    gen = torch.Generator(device=device).manual_seed(problem.seed * 16 + _OPERANDS.index(what))
    a = torch.randn(shapes[what], generator=gen, device=device, dtype=torch.bfloat16)
    if what in ("w", "dense_b"):
        a /= s.k ** 0.5
    return a
