"""Shared test and benchmark cases: one list of cases serves both backends and the harness.

A ``Case`` names a GEMM shape, a token count, a routing kind, a dtype and a fusion;
``make_inputs`` draws its inputs in numpy (fresh and random, never zeros), already rounded to
the dtype, so every backend and the float64 reference see the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from gg_spec.presets import PRESETS, GemmShape, get_shape
from gg_spec.routing import make_routing


@dataclass(frozen=True)
class Fusion:
    permute_x: bool = False
    permute_y: bool = False
    fuse_mul_post: bool = False

    @property
    def name(self) -> str:
        parts = [n for n, on in (("permute_x", self.permute_x), ("permute_y", self.permute_y),
                                 ("mul", self.fuse_mul_post)) if on]
        return "+".join(parts) or "plain"


# What each GEMM of the MoE MLP may fuse (the seed's rules): the first gathers its input,
# the second scatters its output and may apply the routing weights.
FIRST_GEMM_FUSIONS = (Fusion(), Fusion(permute_x=True))
SECOND_GEMM_FUSIONS = (Fusion(), Fusion(permute_y=True), Fusion(fuse_mul_post=True),
                       Fusion(permute_y=True, fuse_mul_post=True))
FUSIONS = {f.name: f for f in FIRST_GEMM_FUSIONS + SECOND_GEMM_FUSIONS}


def fusions_for(shape: GemmShape) -> tuple[Fusion, ...]:
    return FIRST_GEMM_FUSIONS if shape.is_first_gemm else SECOND_GEMM_FUSIONS


@dataclass(frozen=True)
class Case:
    shape: GemmShape
    tokens: int
    dtype: str = "float32"
    routing: str = "random"
    fusion: Fusion = Fusion()
    seed: int = 0

    @property
    def topk(self) -> int:
        return self.shape.topk

    @property
    def id(self) -> str:
        return (f"{self.shape.name}-T{self.tokens}-k{self.topk}-{self.dtype}-{self.routing}"
                f"-{self.fusion.name}-s{self.seed}")

    def with_topk(self, topk: int) -> "Case":
        return replace(self, shape=replace(self.shape, topk=topk,
                                           name=f"{self.shape.name.split('@')[0]}@k{topk}"))


def round_to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """Round float values to `dtype` (float32 result), as the kernels will see them."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "float32":
        return a.copy()
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = a.view(np.uint32).astype(np.uint64)
        # round to nearest even on the upper 16 bits
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    raise ValueError(f"unsupported dtype {dtype!r}")


def make_inputs(case: Case) -> dict[str, np.ndarray]:
    """Inputs of one case, float32 arrays already rounded to case.dtype.

    Keys: x ([T, K] with permute_x else [M, K]), w [E, N, K], dy [M, N], topk_ids [T, k],
    topk_weights [M], m_sizes [E] int32, gather_indices [M] int32.
    """
    rng = np.random.default_rng(case.seed)
    s = case.shape
    routing = make_routing(case.routing, case.tokens, s.num_experts, s.topk, rng)
    m = case.tokens * s.topk
    x_rows = case.tokens if case.fusion.permute_x else m
    # Scale so outputs stay O(1): entries of X W^T sum K products.
    x = rng.standard_normal((x_rows, s.k)).astype(np.float32)
    w = (rng.standard_normal((s.num_experts, s.n, s.k)) / np.sqrt(s.k)).astype(np.float32)
    dy = rng.standard_normal((m, s.n)).astype(np.float32)
    topk_weights = routing.topk_weights
    return {
        "x": round_to_dtype(x, case.dtype),
        "w": round_to_dtype(w, case.dtype),
        "dy": round_to_dtype(dy, case.dtype),
        "topk_ids": routing.topk_ids,
        "topk_weights": round_to_dtype(topk_weights, case.dtype),
        "m_sizes": routing.m_sizes,
        "gather_indices": routing.gather_indices,
    }


def _matrix(shapes, tokens_list, dtypes, routings, topks=(None,), seed=0):
    out = []
    for shape_name in shapes:
        shape = get_shape(shape_name)
        for fusion in fusions_for(shape):
            for tokens in tokens_list:
                for dtype in dtypes:
                    for routing in routings:
                        for topk in topks:
                            case = Case(shape, tokens, dtype, routing, fusion, seed)
                            if topk is not None and topk != shape.topk:
                                if topk > shape.num_experts:
                                    continue
                                case = case.with_topk(topk)
                            out.append(case)
    return out


def cpu_cases(dtypes=("float32", "float16", "bfloat16")) -> list[Case]:
    """Small cases for the interpreters: both GEMMs, every fusion, top-k 1/2/4 in every dtype,
    4-16 experts, odd K and N, several routings."""
    low = tuple(d for d in dtypes if d != "float32")
    cases = _matrix(["tiny_w1", "tiny_w2"], [24], dtypes, ["random"], topks=(1, 2, 4))
    if "float32" in dtypes:
        cases += _matrix(["tiny_many_w1", "tiny_many_w2"], [20], ("float32",), ["skewed"])
    odd_dtypes = tuple(dict.fromkeys(dtypes[:1] + low[-1:]))
    cases += _matrix(["tiny_odd_w1", "tiny_odd_w2"], [13], odd_dtypes, ["empty_experts"])
    return cases


def edge_cases(dtype: str = "float32") -> list[Case]:
    """Experts with no tokens, all tokens on one expert, one token, zero tokens, top-k 1."""
    w1, w2 = get_shape("tiny_odd_w1"), get_shape("tiny_odd_w2")
    out = []
    for shape in (w1, w2):
        for fusion in fusions_for(shape):
            out += [
                Case(shape, 9, dtype, "empty_experts", fusion, 1),
                Case(shape, 11, dtype, "one_expert", fusion, 2),
                Case(shape, 1, dtype, "random", fusion, 3),
                Case(shape, 0, dtype, "random", fusion, 4),
                Case(shape, 17, dtype, "one_expert", fusion, 5).with_topk(1),
            ]
    return out


def gpu_cases(tokens_list=(128, 1024), dtypes=("bfloat16",)) -> list[Case]:
    """Real model shapes for `-m gpu` (bf16 unless asked): Qwen3-30B-A3B, Llama-4-Scout,
    gpt-oss-20b."""
    shapes = ["qwen3_30b_a3b_w1", "qwen3_30b_a3b_w2", "llama4_scout_w1", "llama4_scout_w2",
              "gptoss_20b_w1"]
    return _matrix(shapes, tokens_list, tuple(dtypes), ["random"])


__all__ = ["Case", "Fusion", "FUSIONS", "FIRST_GEMM_FUSIONS", "SECOND_GEMM_FUSIONS",
           "cpu_cases", "edge_cases", "fusions_for", "gpu_cases", "make_inputs",
           "round_to_dtype", "PRESETS"]
