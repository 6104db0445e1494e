"""parity: one grouped-GEMM case through every implementation, against one float64 truth.

    import parity
    case = parity.Case.from_preset("tiny", "second", tokens=16, fusion="permute_y+mul")
    report = parity.run(case)                       # every default backend
    print(report.table())
    parity.check(case, "triton_gg")                 # assert one backend matches the reference
    parity.assert_agrees(parity.run(case, ["triton_gg", "pallas_gg"]))

Backends (``parity.backends``): numpy (gg_spec's float64 reference: sanity), torch (plain torch
ops), triton_gg, pallas_gg, torch_grouped_mm (``torch._grouped_mm``, unfused cases) and
lax_ragged_dot (``jax.lax.ragged_dot``, unfused cases); more with ``register_backend``.
Every framework is imported lazily, by the backend that needs it. The command line is
``python -m parity`` (see ``parity.cli``).

Two modes: on CPU the inputs are drawn in numpy and checked against gg_spec's float64 reference
on the host; on a GPU (or with ``reference="torch"``) they are drawn on the torch device, cached
per shape, and the float64 reference (``parity.reference``, anchored to gg_spec by a CPU test)
and all comparisons run there (``parity.device``).
"""

# inputs first: it sets XLA_PYTHON_CLIENT_PREALLOCATE before anything can import jax
from parity.inputs import Inputs, gpu_available, resolve_device  # noqa: I001
from parity.backends import (DEFAULT_BACKENDS, Backend, Perturbed, Skip, Unavailable,
                             backend_names, get_backend, load_plugin, reference_outputs,
                             register_backend, unregister_backend)
from parity.case import GEMMS, OPS, Case, fusion_by_name, make_cases
from parity.harness import assert_agrees, check, compare, default_pairs, reference_mode, run
from parity.device import DeviceInputs, clear_cache, compare_tensors
from parity.report import Agreement, BackendRun, OutputRow, Report

__all__ = [
    "Agreement", "Backend", "BackendRun", "Case", "DEFAULT_BACKENDS", "DeviceInputs", "GEMMS",
    "Inputs", "clear_cache", "compare_tensors", "reference_mode",
    "OPS", "OutputRow", "Perturbed", "Report", "Skip", "Unavailable", "assert_agrees",
    "backend_names", "check", "compare", "default_pairs", "fusion_by_name", "get_backend",
    "gpu_available", "load_plugin", "make_cases", "reference_outputs", "register_backend",
    "resolve_device", "run", "unregister_backend",
]
