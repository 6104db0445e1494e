"""Cases of the harness: ``gg_spec.cases.Case`` plus the ops to run.

A case is one grouped GEMM (a preset's first or second GEMM, or explicit E, N, K), a token count,
a top-k, a dtype, a routing kind, one fusion and a seed; ``ops`` says which entry points are
compared. Inputs come from ``gg_spec.cases.make_inputs`` unchanged, so a parity case and a
gg_spec case with the same fields see exactly the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gg_spec.cases import FUSIONS, Case as SpecCase, Fusion, fusions_for
from gg_spec.presets import PRESETS, GemmShape, get_preset, get_shape
from gg_spec.routing import ROUTING_KINDS
from gg_spec.tolerances import TOLERANCES

# The entry points a case can exercise. "autograd" is the differentiable op `grouped_gemm`
# (forward output and the gradients of X, W and, when fused, topk_weights).
OPS = ("forward", "dX", "dW", "autograd")
GEMMS = ("first", "second")


def fusion_by_name(name: str | Fusion) -> Fusion:
    """A gg_spec Fusion from its name (plain, permute_x, permute_y, mul, permute_y+mul)."""
    if isinstance(name, Fusion):
        return name
    try:
        return FUSIONS[name]
    except KeyError:
        raise ValueError(f"unknown fusion {name!r}; known: {list(FUSIONS)}") from None


@dataclass(frozen=True)
class Case(SpecCase):
    """gg_spec's Case (shape, tokens, dtype, routing, fusion, seed) plus ``ops``.

    ``fusion`` may be given by name; ``ops`` is any subset of OPS (in OPS order).
    """

    ops: tuple[str, ...] = OPS

    def __post_init__(self):
        if isinstance(self.fusion, str):
            object.__setattr__(self, "fusion", fusion_by_name(self.fusion))
        if isinstance(self.ops, str):
            object.__setattr__(self, "ops", tuple(o for o in self.ops.split(",") if o))
        bad = [o for o in self.ops if o not in OPS]
        if bad or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {self.ops}")
        object.__setattr__(self, "ops", tuple(o for o in OPS if o in self.ops))
        if self.dtype not in TOLERANCES:
            raise ValueError(f"dtype must be one of {list(TOLERANCES)}, got {self.dtype!r}")
        if self.routing not in ROUTING_KINDS:
            raise ValueError(f"routing must be one of {ROUTING_KINDS}, got {self.routing!r}")
        if self.fusion.permute_x and self.fusion.permute_y:
            raise ValueError("permute_x and permute_y cannot both be set")
        if not 1 <= self.shape.topk <= self.shape.num_experts:
            raise ValueError(f"topk={self.shape.topk} must lie in [1, E={self.shape.num_experts}]")
        if self.tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {self.tokens}")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_preset(cls, preset: str, gemm: str = "first", tokens: int = 16, *,
                    topk: int | None = None, dtype: str = "float32", routing: str = "random",
                    fusion: str | Fusion = "plain", seed: int = 0,
                    ops: tuple[str, ...] = OPS) -> "Case":
        """The first (gate_up, K=H, N=2I) or second (down, K=I, N=H) GEMM of a preset."""
        if gemm not in GEMMS:
            raise ValueError(f"gemm must be one of {GEMMS}, got {gemm!r}")
        shape = get_preset(preset).gemm(gemm)
        return cls(shape, tokens, dtype, routing, fusion, seed, ops).with_topk_override(topk)

    @classmethod
    def from_shape(cls, shape: str | GemmShape, tokens: int = 16, **kw) -> "Case":
        """From a gg_spec shape name (``tiny_w1``, ``qwen3_w1``) or a GemmShape."""
        topk = kw.pop("topk", None)
        shape = get_shape(shape) if isinstance(shape, str) else shape
        return cls(shape, tokens, **kw).with_topk_override(topk)

    @classmethod
    def explicit(cls, num_experts: int, n: int, k: int, topk: int, tokens: int = 16, *,
                 first_gemm: bool | None = None, **kw) -> "Case":
        """A shape that is no preset: W [E, N, K]. ``first_gemm`` (default: True unless the
        fusion is a second-GEMM one) only matters to ``fusions_for``."""
        fusion = fusion_by_name(kw.get("fusion", "plain"))
        if first_gemm is None:
            first_gemm = not (fusion.permute_y or fusion.fuse_mul_post)
        shape = GemmShape(f"E{num_experts}_N{n}_K{k}", num_experts, n, k, topk, first_gemm)
        return cls(shape, tokens, **kw)

    @classmethod
    def from_spec(cls, case: SpecCase, ops: tuple[str, ...] = OPS) -> "Case":
        """Lift a gg_spec Case (e.g. from ``gg_spec.cases.cpu_cases()``)."""
        return cls(case.shape, case.tokens, case.dtype, case.routing, case.fusion, case.seed, ops)

    def with_topk_override(self, topk: int | None) -> "Case":
        if topk is None or topk == self.topk:
            return self
        if topk > self.shape.num_experts:
            raise ValueError(f"topk={topk} exceeds the {self.shape.num_experts} experts of "
                             f"{self.shape.name}")
        return self.with_topk(topk)

    def with_ops(self, ops) -> "Case":
        return replace(self, ops=tuple(ops))

    # ------------------------------------------------------------------ derived sizes

    @property
    def m(self) -> int:
        """Routed rows M = T·k."""
        return self.tokens * self.topk

    @property
    def describe(self) -> str:
        s = self.shape
        return (f"E={s.num_experts} N={s.n} K={s.k} T={self.tokens} k={self.topk} M={self.m} "
                f"{self.dtype} routing={self.routing} fusion={self.fusion.name} seed={self.seed}")

    def to_dict(self) -> dict:
        s = self.shape
        return {"id": self.id, "shape": s.name, "num_experts": s.num_experts, "n": s.n,
                "k": s.k, "topk": self.topk, "tokens": self.tokens, "dtype": self.dtype,
                "routing": self.routing, "fusion": self.fusion.name, "seed": self.seed,
                "ops": list(self.ops)}


def make_cases(presets=("tiny",), gemm: str = "both", tokens: int = 16, *,
               topk: int | None = None, dtype: str = "float32", routing: str = "random",
               fusions=None, ops=OPS, seed: int = 0) -> list[Case]:
    """Every (preset, GEMM, fusion) case. ``fusions=None`` gives each GEMM its own fusions
    (first: plain, permute_x; second: plain, permute_y, mul, permute_y+mul); a list of names
    applies those fusions to every selected GEMM; ``"all"`` applies all five."""
    gemms = GEMMS if gemm == "both" else (gemm,)
    out = []
    for preset in presets:
        for g in gemms:
            base = Case.from_preset(preset, g, tokens, topk=topk, dtype=dtype,
                                    routing=routing, seed=seed, ops=ops)
            if fusions is None:
                chosen = fusions_for(base.shape)
            elif fusions == "all":
                chosen = tuple(FUSIONS.values())
            else:
                chosen = tuple(fusion_by_name(f) for f in fusions)
            out += [replace(base, fusion=f) for f in chosen]
    return out


__all__ = ["Case", "GEMMS", "OPS", "PRESETS", "fusion_by_name", "make_cases"]
