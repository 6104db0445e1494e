"""Per-dtype error budgets (DESIGN.md): ||out - ref|| / ||ref|| against the float64 reference
computed on the same (rounded) inputs."""

from __future__ import annotations

import numpy as np

TOLERANCES = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}


def tolerance(dtype: str) -> float:
    dtype = str(dtype).replace("torch.", "")
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for dtype {dtype!r}; known: {sorted(TOLERANCES)}") from None


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf; 0 when both are zero."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: out {out.shape} vs ref {ref.shape}")
    if not np.all(np.isfinite(out)):
        return float("inf")
    diff = np.linalg.norm(out - ref)
    norm = np.linalg.norm(ref)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(diff / norm)


def max_abs_error(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.size == 0:
        return 0.0
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.max(np.abs(out - ref)))
