"""The routing contract, in numpy, and generators of test routings.

``topk_ids [T, k]`` names the experts each token chose; routed row ``r = t·k + j``.
``route`` turns it into ``m_sizes [E]`` (rows per expert) and ``gather_indices [M]``
(the routed row at each expert-order position: a stable argsort of ``topk_ids.ravel()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ROUTING_KINDS = ("balanced", "random", "skewed", "empty_experts", "one_expert")


def route(topk_ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(m_sizes int32 [E], gather_indices int32 [M]) for ``topk_ids [T, k]``."""
    topk_ids = np.asarray(topk_ids)
    if topk_ids.ndim != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {topk_ids.shape}")
    flat = topk_ids.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_experts):
        raise ValueError(
            f"topk_ids values must lie in [0, num_experts={num_experts}), "
            f"got range [{flat.min()}, {flat.max()}]")
    m_sizes = np.bincount(flat, minlength=num_experts).astype(np.int32)
    gather_indices = np.argsort(flat, kind="stable").astype(np.int32)
    return m_sizes, gather_indices


def expert_offsets(m_sizes: np.ndarray) -> np.ndarray:
    """offs [E+1]: expert e owns expert-order positions [offs[e], offs[e+1])."""
    return np.concatenate([[0], np.cumsum(np.asarray(m_sizes, dtype=np.int64))])


def expert_of_position(m_sizes: np.ndarray) -> np.ndarray:
    """e(p) for every expert-order position p, [M]."""
    m_sizes = np.asarray(m_sizes, dtype=np.int64)
    return np.repeat(np.arange(m_sizes.size), m_sizes)


def _distinct_choices(rng: np.random.Generator, tokens: int, num_experts: int,
                      topk: int, probs: np.ndarray | None = None) -> np.ndarray:
    """k distinct experts per token (as real routers pick), optionally weighted."""
    if probs is None:
        scores = rng.random((tokens, num_experts))
    else:
        # Gumbel top-k samples k distinct experts with the given probabilities.
        scores = np.log(probs)[None, :] - np.log(-np.log(rng.random((tokens, num_experts))))
    return np.argsort(-scores, axis=1, kind="stable")[:, :topk]


def make_topk_ids(kind: str, tokens: int, num_experts: int, topk: int,
                  rng: np.random.Generator) -> np.ndarray:
    """topk_ids [T, k] int32 of one routing kind.

    * balanced: every expert gets the same number of rows (to within one)
    * random: k distinct experts per token, uniformly
    * skewed: k distinct experts per token, expert e with probability ∝ 1/(e+1)²
    * empty_experts: the upper half of the experts (at least one) receive no tokens
    * one_expert: every token's first choice is expert 0 (with k = 1: all rows on one expert)
    """
    if topk > num_experts:
        raise ValueError(f"topk={topk} exceeds num_experts={num_experts}")
    if kind == "balanced":
        # consecutive routed rows cycle through the experts: a token's k slots are distinct
        ids = (np.arange(tokens)[:, None] * topk + np.arange(topk)[None, :]) % num_experts
        perm = rng.permutation(num_experts)
        ids = perm[ids]
    elif kind == "random":
        ids = _distinct_choices(rng, tokens, num_experts, topk)
    elif kind == "skewed":
        probs = 1.0 / (np.arange(num_experts) + 1.0) ** 2
        ids = _distinct_choices(rng, tokens, num_experts, topk, probs / probs.sum())
    elif kind == "empty_experts":
        # keep at least one expert empty, unless every expert must serve each token
        live = (min(max(topk, num_experts // 2), num_experts - 1)
                if num_experts > topk else num_experts)
        ids = _distinct_choices(rng, tokens, live, topk)
        ids = rng.permutation(num_experts)[:live][ids]
    elif kind == "one_expert":
        rest = _distinct_choices(rng, tokens, num_experts - 1, topk - 1) + 1
        ids = np.concatenate([np.zeros((tokens, 1), dtype=np.int64), rest], axis=1)
    else:
        raise ValueError(f"unknown routing kind {kind!r}; known: {ROUTING_KINDS}")
    return np.ascontiguousarray(ids, dtype=np.int32).reshape(tokens, topk)


@dataclass(frozen=True)
class Routing:
    """A complete routing of T tokens: ids, routing weights and the derived arrays."""

    topk_ids: np.ndarray        # [T, k] int32
    topk_weights: np.ndarray    # [M] float32, routed-row order (softmax over each token's k)
    m_sizes: np.ndarray         # [E] int32
    gather_indices: np.ndarray  # [M] int32

    @property
    def tokens(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def topk(self) -> int:
        return self.topk_ids.shape[1]

    @property
    def num_experts(self) -> int:
        return self.m_sizes.shape[0]


def make_routing(kind: str, tokens: int, num_experts: int, topk: int,
                 rng: np.random.Generator) -> Routing:
    """A routing of the given kind with softmax routing weights."""
    ids = make_topk_ids(kind, tokens, num_experts, topk, rng)
    logits = rng.standard_normal((tokens, topk))
    weights = np.exp(logits - logits.max(axis=1, keepdims=True)) if tokens else logits
    weights = weights / weights.sum(axis=1, keepdims=True) if tokens else weights
    m_sizes, gather = route(ids, num_experts)
    return Routing(ids, weights.reshape(-1).astype(np.float32), m_sizes, gather)
