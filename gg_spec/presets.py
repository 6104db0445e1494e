"""Model presets: the two grouped-GEMM shapes of each MoE MLP.

An MoE MLP with hidden size H and (per-expert) intermediate size I runs two grouped GEMMs:

* first  (gate_up_proj): K = H,  N = 2·I   (gate and up projections stacked)
* second (down_proj):    K = I,  N = H

Weights follow the ``nn.Linear`` / Hugging Face layout ``W [E, N, K]``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GemmShape:
    """One grouped GEMM: E experts, output size N, reduction size K, top-k routing."""

    name: str
    num_experts: int
    n: int
    k: int
    topk: int
    is_first_gemm: bool

    def flops(self, tokens: int) -> int:
        """2·M·N·K with M = tokens·topk routed rows."""
        return 2 * tokens * self.topk * self.n * self.k


@dataclass(frozen=True)
class ModelPreset:
    """An MoE MLP: hidden size, per-expert intermediate size, experts and top-k."""

    name: str
    hidden: int
    intermediate: int
    num_experts: int
    topk: int

    @property
    def first(self) -> GemmShape:
        return GemmShape(f"{self.name}_w1", self.num_experts, 2 * self.intermediate,
                         self.hidden, self.topk, True)

    @property
    def second(self) -> GemmShape:
        return GemmShape(f"{self.name}_w2", self.num_experts, self.hidden,
                         self.intermediate, self.topk, False)

    def gemm(self, which: str) -> GemmShape:
        if which not in ("first", "second"):
            raise ValueError(f"which must be 'first' or 'second', got {which!r}")
        return self.first if which == "first" else self.second


PRESETS: dict[str, ModelPreset] = {p.name: p for p in [
    # Real models (sizes from their published configs).
    ModelPreset("qwen3_30b_a3b", hidden=2048, intermediate=768, num_experts=128, topk=8),
    ModelPreset("qwen3_235b_a22b", hidden=4096, intermediate=1536, num_experts=128, topk=8),
    ModelPreset("llama4_scout", hidden=5120, intermediate=8192, num_experts=16, topk=1),
    ModelPreset("gptoss_20b", hidden=2880, intermediate=2880, num_experts=32, topk=4),
    ModelPreset("gptoss_120b", hidden=2880, intermediate=2880, num_experts=128, topk=4),
    ModelPreset("mixtral_8x7b", hidden=4096, intermediate=14336, num_experts=8, topk=2),
    ModelPreset("deepseek_v3", hidden=7168, intermediate=2048, num_experts=256, topk=8),
    ModelPreset("olmoe_1b_7b", hidden=2048, intermediate=1024, num_experts=64, topk=8),
    # Tiny presets for CPU tests (interpreters). tiny_odd has K and N that divide no block.
    ModelPreset("tiny", hidden=64, intermediate=48, num_experts=4, topk=2),
    ModelPreset("tiny_odd", hidden=40, intermediate=19, num_experts=5, topk=3),
    ModelPreset("tiny_many", hidden=32, intermediate=32, num_experts=16, topk=4),
]}

REAL_PRESETS = tuple(n for n in PRESETS if not n.startswith("tiny"))
TINY_PRESETS = tuple(n for n in PRESETS if n.startswith("tiny"))

# The four shapes of ANCHORS.md, by the names used there.
ANCHOR_SHAPES: dict[str, GemmShape] = {
    "qwen3_w1": PRESETS["qwen3_30b_a3b"].first,
    "qwen3_w2": PRESETS["qwen3_30b_a3b"].second,
    "llama4_w1": PRESETS["llama4_scout"].first,
    "gptoss_w1": PRESETS["gptoss_20b"].first,
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


def get_shape(name: str) -> GemmShape:
    """A GemmShape by anchor name (``qwen3_w1``) or ``<preset>_w1`` / ``<preset>_w2``."""
    if name in ANCHOR_SHAPES:
        return ANCHOR_SHAPES[name]
    for preset in PRESETS.values():
        for shape in (preset.first, preset.second):
            if shape.name == name:
                return shape
    known = sorted(ANCHOR_SHAPES) + [f"{p}_w1|_w2" for p in PRESETS]
    raise ValueError(f"unknown shape {name!r}; known: {known}")
