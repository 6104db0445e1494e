"""Kernel configs shared by both backends, their validity rules and the tuning search spaces.

A config says how a kernel tiles its work: block sizes along M (routed rows), N and K, the
warps per program, the software-pipelining depth, and Hopper TMA switches. Both backends take
the same objects; a setting a backend cannot honour is documented where it is ignored.
``validate`` is the one place that refuses combinations that cannot work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

_POW2_BLOCKS = (16, 32, 64, 128, 256)
_WARPS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class _TileConfig:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    # Programs that share W (or X) tiles are launched together: tiles are visited in
    # groups of `group_m` M-tiles per N-column for L2 reuse (1 = row-major).
    group_m: int = 1

    def key(self) -> str:
        """A short stable string, used in tuning caches and benchmark rows."""
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# Defaults: the configs the H200 tuning chose at the real presets (benchmarks/tuned/), kept
# valid for every fusion (no TMA switch on an operand some fusion gathers or scatters).

@dataclass(frozen=True)
class ForwardConfig(_TileConfig):
    """Y = X @ W[e].T. TMA switches: load W; load X (not with permute_x, X is gathered);
    store Y (not with permute_y, Y is scattered; accepted and ignored by both backends:
    storing full tiles through TMA measured 2-6% slower than pointer stores in triton_gg's
    persistent forward, benchmarks/NOTES.md step 14). ``warp_specialize``: triton_gg only (Triton's
    automatic warp specialization of the persistent tile loop on Hopper); pallas_gg
    ignores it."""

    block_n: int = 256
    group_m: int = 8
    tma_load_w: bool = True
    tma_load_x: bool = False
    tma_store_y: bool = False
    warp_specialize: bool = False


@dataclass(frozen=True)
class DXConfig(_TileConfig):
    """dX = dY @ W[e]; the reduction runs over N. TMA switches: load W; load dY (not with
    permute_y, dY is gathered); store dX (not with permute_x, dX is scattered; accepted
    and ignored by both backends: a dX tile can straddle two experts' rows)."""

    block_n: int = 64
    block_k: int = 256
    tma_load_w: bool = True
    tma_load_dy: bool = False
    tma_store_dx: bool = False


@dataclass(frozen=True)
class DWConfig(_TileConfig):
    """dW[e] = dY_e^T X_e; the reduction runs over each expert's rows (block_m is the
    reduction block). TMA switches: load X (not with permute_x), load dY (not with
    permute_y), store dW (never scattered; triton_gg only, pallas_gg ignores every TMA
    switch)."""

    block_m: int = 32
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    tma_load_x: bool = False
    tma_load_dy: bool = False
    tma_store_dw: bool = False


AnyConfig = Union[ForwardConfig, DXConfig, DWConfig]
CONFIG_TYPES = {"forward": ForwardConfig, "dX": DXConfig, "dW": DWConfig}
OPS = tuple(CONFIG_TYPES)


def validate(op: str, config: AnyConfig, *, permute_x: bool = False, permute_y: bool = False,
             fuse_mul_post: bool = False, is_first_gemm: bool | None = None) -> None:
    """Refuse a combination that cannot work, with a ValueError that names the conflict.

    ``op`` is ``"forward"``, ``"dX"`` or ``"dW"``. ``is_first_gemm`` (when known) enforces
    that permute_x belongs to the first GEMM of the MoE MLP and permute_y to the second.
    """
    if op not in CONFIG_TYPES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    expected = CONFIG_TYPES[op]
    if type(config) is not expected:
        raise ValueError(f"config for {op} must be a {expected.__name__}, "
                         f"got {type(config).__name__}")
    if permute_x and permute_y:
        raise ValueError("permute_x and permute_y cannot both be set: permute_x fuses the "
                         "gather of the first GEMM, permute_y the scatter of the second")
    if is_first_gemm is True and permute_y:
        raise ValueError("permute_y is for the second GEMM (down_proj), not the first")
    if is_first_gemm is False and permute_x:
        raise ValueError("permute_x is for the first GEMM (gate_up_proj), not the second")
    if fuse_mul_post and op != "forward":
        raise ValueError(f"fuse_mul_post applies to the forward GEMM only, not {op}")
    _validate_tiles(config)
    gathered, scattered = _gathered_and_scattered(op, permute_x, permute_y)
    for field, operand in _TMA_OPERANDS[op].items():
        if getattr(config, field) and operand in gathered:
            raise ValueError(f"{expected.__name__}.{field}=True conflicts with "
                             f"{'permute_x' if permute_x else 'permute_y'}: {operand} is "
                             f"gathered row by row, which a TMA tile load cannot do")
        if getattr(config, field) and operand in scattered:
            raise ValueError(f"{expected.__name__}.{field}=True conflicts with "
                             f"{'permute_x' if permute_x else 'permute_y'}: {operand} is "
                             f"scattered row by row, which a TMA tile store cannot do")


# config field -> the operand it moves, per op
_TMA_OPERANDS = {
    "forward": {"tma_load_w": "W", "tma_load_x": "X", "tma_store_y": "Y"},
    "dX": {"tma_load_w": "W", "tma_load_dy": "dY", "tma_store_dx": "dX"},
    "dW": {"tma_load_x": "X", "tma_load_dy": "dY", "tma_store_dw": "dW"},
}


def _gathered_and_scattered(op: str, permute_x: bool, permute_y: bool):
    """Which operands are read row-gathered and which outputs are row-scattered."""
    if op == "forward":
        return ({"X"} if permute_x else set()), ({"Y"} if permute_y else set())
    if op == "dX":
        return ({"dY"} if permute_y else set()), ({"dX"} if permute_x else set())
    return ({"X"} if permute_x else set()) | ({"dY"} if permute_y else set()), set()


def _validate_tiles(config: AnyConfig) -> None:
    name = type(config).__name__
    for field in ("block_m", "block_n", "block_k"):
        value = getattr(config, field)
        if value not in _POW2_BLOCKS:
            raise ValueError(f"{name}.{field}={value} must be one of {_POW2_BLOCKS} "
                             f"(a power of two the matrix units accept)")
    if config.num_warps not in _WARPS:
        raise ValueError(f"{name}.num_warps={config.num_warps} must be one of {_WARPS}")
    if not 1 <= config.num_stages <= 8:
        raise ValueError(f"{name}.num_stages={config.num_stages} must lie in [1, 8]")
    if not 1 <= config.group_m <= 64:
        raise ValueError(f"{name}.group_m={config.group_m} must lie in [1, 64]")


# ----------------------------------------------------------------------------------------
# Defaults and search spaces. Defaults are chosen for Hopper at the real presets (see
# benchmarks/NOTES.md for the measurements behind them); the search spaces are what
# autotuning tries, filtered by `validate` for the fusions at hand.

def default_config(op: str) -> AnyConfig:
    return CONFIG_TYPES[op]()


# (block_m, block_n, block_k, num_warps, num_stages) candidates per op: tile shapes that keep
# Hopper's tensor cores fed (wgmma wants 64-row multiples per warpgroup) at sizes that fit
# shared memory for 3-4 pipeline stages of bf16 operands.
# A sixth element, where present, sets further fields.
_STORE_DW = {"tma_store_dw": True}
_SEARCH = {
    # forward (persistent in triton_gg): 128 x 256 on two warpgroups, with and without
    # warp specialization; 128 x 128 on one warpgroup, two programs per SM; row-major order
    # for comparison (persistent-probe measurements, benchmarks/NOTES.md step 13)
    "forward": [(128, 256, 64, 8, 3), (128, 256, 64, 8, 3, {"warp_specialize": True}),
                (128, 128, 64, 4, 3), (128, 128, 64, 8, 4),
                (128, 256, 64, 8, 3, {"group_m": 1}), (64, 256, 64, 8, 3)],
    # dX: block_n is the reduction block, (block_m, block_k) the output tile
    "dX": [(128, 64, 128, 8, 3), (128, 64, 128, 4, 4), (128, 64, 256, 8, 3),
           (64, 64, 128, 4, 4), (128, 32, 128, 4, 4), (128, 128, 128, 8, 3),
           (256, 64, 128, 8, 3), (64, 64, 256, 8, 3)],
    # dW: block_m is the reduction block, (block_n, block_k) the output tile
    # (persistent in triton_gg: the one-warpgroup tiles run two programs per SM)
    # (and the two-warpgroup tiles once more with only the TMA store: NOTES step 14)
    "dW": [(64, 128, 128, 4, 3), (64, 128, 128, 8, 3), (64, 128, 128, 4, 4),
           (32, 128, 128, 4, 4), (64, 128, 256, 8, 3), (64, 256, 128, 8, 3),
           (128, 128, 128, 8, 3), (64, 64, 128, 4, 4), (32, 256, 128, 8, 4),
           (64, 128, 256, 8, 3, _STORE_DW), (64, 256, 128, 8, 3, _STORE_DW),
           (64, 128, 128, 8, 3, _STORE_DW)],
}


def search_space(op: str) -> list[AnyConfig]:
    """Candidate configs for autotuning ``op`` (TMA switches off, except the store-only dW
    entries; ``valid_candidates(with_tma=True)`` adds each with every legal switch on)."""
    cls = CONFIG_TYPES[op]
    return [cls(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st,
                **(extra[0] if extra else {}))
            for bm, bn, bk, w, st, *extra in _SEARCH[op]]


def tma_variants(config: AnyConfig) -> list[AnyConfig]:
    """The config with each TMA switch on, alone and all together."""
    names = [f.name for f in dataclasses.fields(config) if f.name.startswith("tma_")]
    out = [config.replace(**{n: True}) for n in names]
    out.append(config.replace(**{n: True for n in names}))
    return out


def with_legal_tma(op: str, config: AnyConfig, *, permute_x: bool = False,
                   permute_y: bool = False) -> AnyConfig:
    """The config with every TMA switch on that these fusions allow."""
    gathered, scattered = _gathered_and_scattered(op, permute_x, permute_y)
    blocked = gathered | scattered
    return config.replace(**{field: True for field, operand in _TMA_OPERANDS[op].items()
                             if operand not in blocked})


def valid_candidates(op: str, *, permute_x: bool = False, permute_y: bool = False,
                     with_tma: bool = False) -> list[AnyConfig]:
    """The search space for these fusions; with_tma adds each candidate with every legal
    TMA switch on."""
    candidates = search_space(op)
    if with_tma:
        candidates = candidates + [with_legal_tma(op, c, permute_x=permute_x,
                                                  permute_y=permute_y) for c in candidates]
    out = []
    for config in candidates:
        try:
            validate(op, config, permute_x=permute_x, permute_y=permute_y)
        except ValueError:
            continue
        if config not in out:  # e.g. a store-only entry with every switch turned on
            out.append(config)
    return out


def token_bucket(rows: int) -> int:
    """Round a routed-row count up to a power of two: the tuning cache's row key."""
    bucket = 1
    while bucket < rows:
        bucket *= 2
    return bucket


def tuning_key(op: str, *, num_experts: int, n: int, k: int, rows: int, dtype: str,
               permute_x: bool = False, permute_y: bool = False,
               fuse_mul_post: bool = False, device: str = "") -> str:
    """The key under which both backends cache a tuned config. ``device`` is the device's
    product name with spaces as underscores ("NVIDIA_H200"), or "cpu"."""
    return (f"{op}|E={num_experts}|N={n}|K={k}|rows~{token_bucket(rows)}|{dtype}"
            f"|px={int(permute_x)}|py={int(permute_y)}|mul={int(fuse_mul_post)}|{device}")


def config_to_dict(config: AnyConfig) -> dict:
    return {"op": next(op for op, cls in CONFIG_TYPES.items() if type(config) is cls),
            **dataclasses.asdict(config)}


def config_from_dict(data: dict) -> AnyConfig:
    data = dict(data)
    op = data.pop("op")
    return CONFIG_TYPES[op](**data)
