"""Which Pallas lowering runs a call, and whether it runs interpreted.

``backend="auto" | "mosaic" | "triton"`` is accepted by every public function. ``"auto"`` picks,
per GEMM, Mosaic GPU where it measured faster on Hopper (``pick_lowering``) and the Triton
lowering elsewhere; ``"mosaic"`` (Mosaic GPU, for Hopper; ``pallas_gg.mosaic_lowering``)
runs the direct forward, dX and dW, the differentiable op, routing and the expert block,
and raises NotImplementedError for the rest (ragged_dot, tune).
Without a GPU (or for arrays that live on the CPU) the kernels run with ``interpret=True``.

JAX deprecates Pallas' Triton lowering in favour of Mosaic GPU. On a JAX without it
(``triton_lowering_available()`` is False) ``"auto"`` runs every GEMM on Mosaic GPU (on
Hopper, or in Mosaic GPU's interpreter without a GPU) and refuses, naming the reason, a call
that Mosaic GPU cannot run (fp32, a non-Hopper GPU, N or K not a multiple of 64); an explicit
``backend="triton"`` raises ``TritonLoweringUnavailable``. ``pallas_gg.triton_lowering`` is
imported on first use only (``triton_lowering_module``), so ``import pallas_gg`` works there.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "mosaic", "triton")

# JAX 0.11 deprecates Pallas' Triton lowering and warns each time a kernel is lowered. The
# lowering of a kernel inside a user's jax.jit happens when *their* function compiles, outside
# any call of ours, so a catch_warnings block around our calls cannot reach it: we add one
# narrow process-wide filter for exactly this message (and still wrap our own calls).
_TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"
warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION, category=DeprecationWarning)


@contextlib.contextmanager
def quiet_triton_deprecation():
    """Silence the Triton-lowering deprecation warning for calls made in this block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TRITON_DEPRECATION,
                                category=DeprecationWarning)
        yield


class TritonLoweringUnavailable(RuntimeError):
    """The call needs Pallas' Triton lowering, which this JAX does not have."""


_triton_available: bool | None = None


def triton_lowering_available() -> bool:
    """Whether this JAX still has Pallas' Triton lowering: ``jax.experimental.pallas.triton``
    imports with what ``pallas_gg.triton_lowering`` uses (``CompilerParams``, ``load``,
    ``store``), and ``pallas_gg.triton_lowering`` itself imports. Probed once per process, on
    the first call that picks a lowering (not at import)."""
    global _triton_available
    if _triton_available is None:
        try:
            mod = importlib.import_module("jax.experimental.pallas.triton")
            ok = all(hasattr(mod, name) for name in ("CompilerParams", "load", "store"))
            if ok:
                with quiet_triton_deprecation():
                    importlib.import_module("pallas_gg.triton_lowering")
        except Exception:  # noqa: BLE001 - any failure to import means: not usable here
            ok = False
        _triton_available = ok
    return _triton_available


def _triton_missing_message(what: str) -> str:
    return (f"{what} needs Pallas' Triton lowering (jax.experimental.pallas.triton), which "
            f"this JAX ({jax.__version__}) does not have: JAX deprecated it in favour of "
            f"Mosaic GPU")


def triton_lowering_module():
    """``pallas_gg.triton_lowering``, imported on first use; TritonLoweringUnavailable where
    this JAX has no Triton lowering."""
    if not triton_lowering_available():
        raise TritonLoweringUnavailable(_triton_missing_message(
            "backend='triton' (or a function that runs only on it)")
            + "; use backend='mosaic' or 'auto' (Mosaic GPU: Hopper, bf16/fp16)")
    with quiet_triton_deprecation():
        return importlib.import_module("pallas_gg.triton_lowering")


# The unfused ops in which the Mosaic GPU lowering measured faster than the Triton lowering
# on Hopper with default tiles: "auto" picks Mosaic for these. None so far (benchmarks/
# NOTES.md step 12, H200): with balanced routing Mosaic's forward ran 1.03-1.09x the Triton
# lowering on the Qwen3 shapes and its dX 1.01-1.06x on three shapes, but in `python -m
# benchmarks` (random routing, the Triton lowering tuned) 0.88-1.00x forward, 0.92-0.98x
# dX, 0.8x dW. The fused forms (permute_x / permute_y / fuse_mul_post) run on Mosaic as
# separate gather passes, slower than the Triton lowering's fused row loads.
MOSAIC_FASTER_OPS: frozenset[str] = frozenset()
_MOSAIC_DTYPES = ("bfloat16", "float16")


def _on_hopper() -> bool:
    """The default device is an sm_90 GPU (H100 / H200 / H800 / H20). The default device,
    not the arrays' (under jit they have none yet): a process mixing GPU kinds should name
    the backend."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return False
    cc = getattr(dev, "compute_capability", None)
    if cc is not None:
        return str(cc).startswith("9.")
    return any(name in getattr(dev, "device_kind", "") for name in ("H100", "H200", "H800",
                                                                   "H20"))


def pick_lowering(backend: str, *, op: str, dtype, n: int, k: int, fused: bool,
                  config_given: bool, interpret: bool) -> str:
    """The lowering of one op ("forward", "dX" or "dW") of a call. ``"auto"`` picks Mosaic
    GPU where it measured faster (``MOSAIC_FASTER_OPS``, unfused, on Hopper, bf16/fp16,
    output columns a multiple of 128 and the reduction of 64: with 64-wide output tiles
    (gpt-oss's K = 2880 in dX) it measured 0.73x; no config or tuner given: those are the
    Triton lowering's) and the Triton lowering everywhere else, the interpreter included."""
    if n == 0 or k == 0:  # nothing to compute: either lowering returns zeros unlaunched
        resolve_backend(backend, mosaic_ready=True)  # the name, and "triton" where it is gone
        return "triton" if triton_lowering_available() else "mosaic"
    if backend != "auto":
        return resolve_backend(backend, mosaic_ready=True)
    if not triton_lowering_available():
        return _mosaic_fallback(op, dtype=dtype, n=n, k=k, config_given=config_given,
                                interpret=interpret)
    if op == "dW":  # output tiles over N and K (64 or 128 wide), reduction over rows
        tiles_fit = n % 64 == 0 and k % 64 == 0
    else:           # output columns N (forward) or K (dX), reduction over the other
        out_cols, reduction = (n, k) if op == "forward" else (k, n)
        tiles_fit = out_cols % 128 == 0 and reduction % 64 == 0
    mosaic = (op in MOSAIC_FASTER_OPS and not fused and not config_given and not interpret
              and str(jnp.dtype(dtype)) in _MOSAIC_DTYPES and tiles_fit and _on_hopper())
    return "mosaic" if mosaic else "triton"


def _mosaic_fallback(op: str, *, dtype, n: int, k: int, config_given: bool,
                     interpret: bool) -> str:
    """"auto" on a JAX without the Triton lowering: Mosaic GPU, the only lowering left, where
    it can run the call; else TritonLoweringUnavailable naming what stands in the way. Any M
    runs (the kernels pad rows to a multiple of 8); N and K must take the default tiles
    (multiples of 64) unless a config is given (its own tiles are checked by the kernels)."""
    reasons = []
    if str(jnp.dtype(dtype)) not in _MOSAIC_DTYPES:
        reasons.append(f"it runs bf16 and fp16 only, not {jnp.dtype(dtype).name}")
    if not config_given and (n % 64 or k % 64):
        reasons.append(f"its tiles need N and K in multiples of 64, got N={n}, K={k}")
    if not interpret and not _on_hopper():
        reasons.append(f"it compiles for Hopper (sm_90) only, not {jax.devices()[0]}")
    if reasons:
        raise TritonLoweringUnavailable(
            _triton_missing_message(f"backend='auto' ({op})") + ", and Mosaic GPU cannot run "
            f"this call: " + "; ".join(reasons))
    return "mosaic"


def resolve_backend(backend: str, *, mosaic_ready: bool = False) -> str:
    """The lowering that will run, for functions without a per-op choice: ``"auto"`` is the
    Triton lowering there (see ``pick_lowering`` for the GEMMs), or Mosaic GPU on a JAX
    without it (where ``mosaic_ready``; TritonLoweringUnavailable elsewhere). ``"mosaic"``
    runs where its kernels exist (``mosaic_ready``) and raises NotImplementedError elsewhere;
    ``"triton"`` raises TritonLoweringUnavailable on a JAX without that lowering."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "mosaic" and not triton_lowering_available():
        if backend == "auto" and mosaic_ready:
            return "mosaic"
        raise TritonLoweringUnavailable(
            _triton_missing_message(f"backend={backend!r}" + (
                "" if mosaic_ready else " for this function (not on Mosaic GPU yet)"))
            + ("; use backend='mosaic' or 'auto'" if mosaic_ready else ""))
    if backend == "mosaic":
        if not mosaic_ready:
            raise NotImplementedError(
                "backend='mosaic' (the Mosaic GPU lowering of pallas_gg, for Hopper) runs "
                "grouped_gemm_forward / _dX / _dW, grouped_gemm, route and moe_experts so "
                "far; this function on it is planned but not implemented yet: use "
                "backend='triton' or 'auto'")
        return "mosaic"
    return "triton"


def _is_concrete(a) -> bool:
    return isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)


def _abstract_target_platform() -> str | None:
    """The platform of an abstract device set with jax.sharding.use_abstract_mesh (an AOT
    compile for a GPU from a host without one), if any."""
    try:
        device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    except Exception:  # noqa: BLE001 - no abstract mesh support: no AOT target
        return None
    return None if device is None else device.platform


def use_interpreter(*arrays) -> bool:
    """Interpret the kernels when there is no GPU or the (concrete) arrays live on a CPU.

    Under tracing the placement of a tracer is not known; the default backend decides, unless
    an abstract GPU device is the target (AOT lowering from a host without a GPU).
    """
    if _abstract_target_platform() == "gpu":
        return False
    if jax.default_backend() != "gpu":
        return True
    for a in arrays:
        if _is_concrete(a):
            try:
                if any(d.platform != "gpu" for d in a.devices()):
                    return True
            except Exception:  # noqa: BLE001 - a deleted or exotic array: let JAX decide
                pass
    return False


def device_label() -> str:
    """The device's product name as tuning-cache keys spell it in both backends
    ("NVIDIA_H200"; "cpu" without a GPU), so one problem has one key everywhere."""
    dev = jax.devices()[0]
    if dev.platform == "gpu":
        return getattr(dev, "device_kind", "gpu").replace(" ", "_")
    return dev.platform
