"""Which Pallas lowering runs a call, and whether it runs interpreted.

``backend="auto" | "mosaic" | "triton"`` is accepted by every public function. ``"auto"`` picks
the Triton lowering; ``"mosaic"`` (Mosaic GPU, for Hopper; ``pallas_gg.mosaic_lowering``) runs
the direct forward, dX and dW, the differentiable op, routing and the expert block, and
raises NotImplementedError for the rest (ragged_dot, tune).
Without a GPU (or for arrays that live on the CPU) the kernels run with ``interpret=True``.
"""

from __future__ import annotations

import contextlib
import warnings

import jax

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


def resolve_backend(backend: str, *, mosaic_ready: bool = False) -> str:
    """The lowering that will run. ``"auto"`` is the Triton lowering (the Mosaic GPU one is
    not yet measured faster anywhere). ``"mosaic"`` runs where its kernels exist
    (``mosaic_ready``) and raises NotImplementedError elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
