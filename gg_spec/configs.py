"""Kernel configs shared by both backends, their validity rules and the tuning search spaces.

A config says how a kernel tiles its work: block sizes along M (routed rows), N and K, the
warps per program, the software-pipelining depth, and Hopper TMA switches. Both backends take
the same objects; a setting a backend cannot honour is documented where it is ignored.
``validate`` is the one place that refuses combinations that cannot work.
"""

from __future__ import annotations

import dataclasses
import functools
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
             fuse_mul_post: bool = False, is_first_gemm: bool | None = None,
             dtype: str | None = None, limit: int | None = None) -> None:
    """Refuse a combination that cannot work, with a ValueError that names the conflict.

    ``op`` is ``"forward"``, ``"dX"`` or ``"dW"``. ``is_first_gemm`` (when known) enforces
    that permute_x belongs to the first GEMM of the MoE MLP and permute_y to the second.
    With ``dtype`` (the operands' dtype name: "bfloat16", "float16", "float32") a config
    whose triton_gg program needs more shared memory than ``limit`` (default
    ``SHARED_MEMORY_LIMIT``) is refused too (``shared_memory_bytes``).
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
    if dtype is not None:
        limit = SHARED_MEMORY_LIMIT if limit is None else limit
        needed = shared_memory_bytes(op, config, dtype)
        if needed > limit:
            raise ValueError(
                f"{config!r} needs about {needed} bytes of shared memory per program for "
                f"{dtype} operands, over the limit of {limit} bytes (Hopper: 227 KB per "
                f"block); take fewer num_stages or smaller block sizes "
                f"(gg_spec.default_config({op!r}, {dtype!r}) fits)")


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

# ---------------------------------------------------------------------------- shared memory

# Bytes of shared memory one thread block may use on Hopper (sm_90, H100 / H200) with the
# opt-in attribute: 227 KB = 232448 bytes (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability": maximum shared memory per thread block 227 KB for
# compute capability 9.0; cudaDevAttrMaxSharedMemoryPerBlockOptin reads 232448 on the H200,
# and Triton's OutOfResources message quotes it as the "Hardware limit").
SHARED_MEMORY_LIMIT = 232448

ELEMENT_SIZES = {"bfloat16": 2, "float16": 2, "float32": 4}
DTYPES = tuple(ELEMENT_SIZES)


def dtype_name(dtype) -> str:
    """"float32" / "bfloat16" / "float16" from a name, a torch or numpy dtype ("torch.float32"
    is accepted) or a JAX dtype; ValueError for anything else."""
    name = getattr(dtype, "name", None)
    if not isinstance(name, str) and isinstance(dtype, type):  # jnp.float32, np.float32
        name = dtype.__name__
    if not isinstance(name, str):  # torch.dtype has no .name; str() is "torch.float32"
        name = str(dtype)
    name = name.replace("torch.", "")
    if name not in ELEMENT_SIZES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def _tiles(op: str, config: AnyConfig) -> tuple[int, int, int]:
    """Elements of (first operand tile, second operand tile, output tile) of one step."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    if op == "forward":  # X [bm, bk], W [bn, bk] -> Y [bm, bn]
        return bm * bk, bn * bk, bm * bn
    if op == "dX":       # dY [bm, bn], W [bn, bk] -> dX [bm, bk]
        return bm * bn, bn * bk, bm * bk
    if op == "dW":       # dY [bm, bn], X [bm, bk] -> dW [bn, bk]
        return bm * bn, bm * bk, bn * bk
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def shared_memory_bytes(op: str, config: AnyConfig, dtype="bfloat16") -> int:
    """An upper estimate of the shared memory (bytes) one triton_gg program of ``op`` takes
    with ``config`` on Hopper for operands of ``dtype`` (Triton 3.6, sm_90).

    Calibrated against ``compiled.metadata.shared`` of the kernels compiled for sm_90
    (``triton_gg.kernels.compile_sm90``; ``tests/test_compile_sm90.py`` checks that it is
    never below the real value for the search space, defaults and shipped configs):

    * operand buffers: ``buffers x (A tile + B tile) x element size``. bf16 / fp16 dots run
      on wgmma, which reads its operands from shared memory: ``num_stages`` buffers. fp32
      dots run in IEEE precision on the FMA units (no tensor cores), where Triton's
      pipeliner keeps ``num_stages - 1`` buffers in flight (at least one).
    * one mbarrier (8 bytes) per buffer (TMA loads).
    * forward: its tile loop and K loop are one flattened loop, so the buffers stay live
      through the epilogue, whose register-layout conversion of the output tile takes a
      scratch buffer of its own: at most the whole output tile in the output dtype. In fp32
      the FMA dot stages the transposed W tile in shared memory (one B tile) in the space of
      the conversion (never live at once; the conversion of an fp32 blocked tile measured a
      quarter of the tile at most): the larger of the two is counted.
    * dW with ``tma_store_dw``: the output tile staged for the TMA store; in fp32 with
      ``tma_load_dy`` also the transposed dY tile the FMA dot reads.
    * dX, and dW's epilogue otherwise: the conversion reuses the dead operand buffers.
    """
    dtype = dtype_name(dtype)
    elem = ELEMENT_SIZES[dtype]
    a, b, out = _tiles(op, config)
    mma = dtype != "float32"
    buffers = config.num_stages if mma else max(1, config.num_stages - 1)
    total = buffers * ((a + b) * elem + 8)
    if op == "forward":
        total += out * elem if mma else max(b, out // 4) * elem
    elif op == "dW":
        if config.tma_store_dw:
            total += out * elem
        if not mma and config.tma_load_dy:  # the FMA dot stages the TMA tile of dY^T
            total += a * elem
    return total


def fits(op: str, config: AnyConfig, dtype="bfloat16", limit: int | None = None) -> bool:
    """Whether ``config`` fits the shared memory of one thread block (``limit``, default
    ``SHARED_MEMORY_LIMIT``) for ``dtype`` operands (``shared_memory_bytes``)."""
    limit = SHARED_MEMORY_LIMIT if limit is None else limit
    return shared_memory_bytes(op, config, dtype) <= limit


def _shrunk(config: AnyConfig):
    """Smaller variants of a config, in the order ``default_config`` tries them: the same
    tile with fewer stages (down to 2), then block_k halved (down to 32) at each stage
    count, then block_n, then block_m halved (down to 64)."""
    tiles = [config]
    for field, floor in (("block_k", 32), ("block_n", 64), ("block_m", 64)):
        more = []
        for tile in tiles:
            while getattr(tile, field) // 2 >= floor:
                tile = tile.replace(**{field: getattr(tile, field) // 2})
                more.append(tile)
        tiles += more
    for tile in tiles:
        for stages in range(config.num_stages, 1, -1):
            yield tile.replace(num_stages=stages)


# float32 defaults. IEEE fp32 dots run on the FMA units, not the tensor cores, and there the
# 2-byte defaults' large tiles ran at 0.14-0.4 TFLOP/s on an H200 (register-bound), small
# tiles 6-18 (``python -m benchmarks.fp32_probe --sweep``, Qwen3-30B-A3B gate_up, T = 512,
# 2026-12-02): forward 32x128x32 on 4 warps 6.0 TFLOP/s (the 2-byte tile at 2 stages:
# 0.14), dX 32x64x32 11.2 (0.16), dW 32x128x32 18.0 (10.9).
_FP32_DEFAULTS = {
    "forward": ForwardConfig(block_m=32, block_n=128, block_k=32, num_warps=4, num_stages=3),
    "dX": DXConfig(block_m=32, block_n=64, block_k=32, num_warps=4, num_stages=3),
    "dW": DWConfig(block_m=32, block_n=128, block_k=32, num_warps=4, num_stages=3),
}


@functools.lru_cache(maxsize=None)  # every call without a tuned entry asks (tens of us)
def default_config(op: str, dtype=None) -> AnyConfig:
    """The default config of ``op``; with ``dtype`` one for operands of that dtype that fits
    Hopper's shared memory: the default itself for bf16 and fp16, small FMA-friendly tiles
    for fp32 (``_FP32_DEFAULTS``), and where a default does not fit, the first fitting of
    ``_shrunk``."""
    if op not in CONFIG_TYPES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    config = CONFIG_TYPES[op]()
    if dtype is None:
        return config
    dtype = dtype_name(dtype)
    if dtype == "float32":
        config = _FP32_DEFAULTS[op]
    for candidate in _shrunk(config):
        if fits(op, candidate, dtype):
            return candidate
    raise AssertionError(f"no {op} config fits {dtype}")  # unreachable for the defaults


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
                     with_tma: bool = False, dtype=None) -> list[AnyConfig]:
    """The search space for these fusions; with_tma adds each candidate with every legal
    TMA switch on. With ``dtype``, candidates that do not fit Hopper's shared memory for
    that dtype are left out, and the fitting default of the dtype joins where no
    candidate remains."""
    candidates = search_space(op)
    if dtype is not None and dtype_name(dtype) == "float32":
        candidates = [_FP32_DEFAULTS[op]] + candidates  # the FMA tile, tried first
    if with_tma:
        candidates = candidates + [with_legal_tma(op, c, permute_x=permute_x,
                                                  permute_y=permute_y) for c in candidates]
    out = []
    for config in candidates:
        try:
            validate(op, config, permute_x=permute_x, permute_y=permute_y, dtype=dtype)
        except ValueError:
            continue
        if config not in out:  # e.g. a store-only entry with every switch turned on
            out.append(config)
    if not out and dtype is not None:
        out.append(default_config(op, dtype))
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


def key_dtype(key: str) -> str | None:
    """The dtype name field of a ``tuning_key`` (None if `key` is not one)."""
    fields = key.split("|")
    return fields[5] if len(fields) > 5 and fields[5] in ELEMENT_SIZES else None


def config_to_dict(config: AnyConfig) -> dict:
    return {"op": next(op for op, cls in CONFIG_TYPES.items() if type(config) is cls),
            **dataclasses.asdict(config)}


def config_from_dict(data: dict) -> AnyConfig:
    data = dict(data)
    op = data.pop("op")
    return CONFIG_TYPES[op](**data)
