"""``run(case)``: one case through every backend against a float64 reference.

The inputs are generated once and handed to every backend; the reference is computed once per
op; each backend's outputs are compared with it, and the outputs of backend pairs (triton_gg vs
pallas_gg by default) with each other. Work goes op by op, so only one op's reference and the
outputs of paired backends are alive at a time.

Two modes (``reference_mode``): host (numpy inputs from ``gg_spec.cases.make_inputs``,
``gg_spec.reference`` on the host, numpy comparisons: the ground truth, the default without a
GPU) and device (``parity.device``: inputs drawn by torch on its device and cached per shape,
the float64 torch reference ``parity.reference`` and the comparisons on the device, only scalars
brought back: the default on a GPU, where the host mode takes minutes per real-model case).
``check`` and ``assert_agrees`` are the helpers for the test suites of triton_gg and pallas_gg.
"""

from __future__ import annotations

import math
import os
import time
import traceback

import numpy as np

from gg_spec.tolerances import max_abs_error, rel_error, tolerance
from parity.backends import (DEFAULT_BACKENDS, Backend, Skip, Unavailable, get_backend,
                             reference_outputs)
from parity.case import Case
from parity.inputs import Inputs, resolve_device
from parity.report import Agreement, BackendRun, OutputRow, Report, to_float64

# The two implementations of the contract must agree with each other, not only each with
# the reference: by default triton_gg against every pallas_gg variant in the run
# (pallas_gg, pallas_gg:triton, pallas_gg:mosaic).
def default_pairs(names) -> tuple[tuple[str, str], ...]:
    return tuple(("triton_gg", n) for n in names
                 if "triton_gg" in names and n.split(":")[0] == "pallas_gg")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def compare(out: np.ndarray, ref: np.ndarray, tol: float) -> tuple[float, float, bool, str]:
    """(rel error, max abs error, passed, note) of one float64 output against its reference;
    a shape mismatch or a non-finite value fails with an explanatory note.

    Same numbers as ``gg_spec.rel_error`` / ``gg_spec.max_abs_error`` (non-finite -> inf,
    0 when both are zero), computed from one difference array: a real-model dW has 1e8+
    elements and the separate functions would each make several passes over it."""
    if out.shape != ref.shape:
        return float("inf"), float("inf"), False, f"shape {out.shape} != {ref.shape}"
    if out.size == 0:
        return 0.0, 0.0, True, ""
    diff = (out - ref).ravel()
    sq = float(np.dot(diff, diff))
    if not math.isfinite(sq):
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        if bad:
            return float("inf"), float("inf"), False, f"{bad} non-finite values"
        # finite values whose squares overflow: fall back to the careful definitions
        rel, mx = rel_error(out, ref), max_abs_error(out, ref)
        return rel, mx, rel <= tol, ""
    max_abs = float(max(diff.max(), -diff.min()))
    ref_flat = ref.ravel()
    norm = math.sqrt(float(np.dot(ref_flat, ref_flat)))
    if norm == 0.0:
        rel = 0.0 if sq == 0.0 else float("inf")
    else:
        rel = math.sqrt(sq) / norm
    return rel, max_abs, rel <= tol, ""


class _HostMode:
    """gg_spec's way: numpy inputs (``Inputs``), the numpy float64 reference on the host,
    outputs compared as float64 numpy arrays."""

    reference = "numpy"

    def __init__(self, case: Case, device, inputs):
        self.case = case
        self.inputs = inputs if inputs is not None else Inputs(case, device)

    @property
    def device(self) -> str:
        # which device the torch/JAX inputs lived on (only resolved if a framework ran)
        return self.inputs._device or "cpu"

    def reference_outputs(self, op: str) -> dict:
        return reference_outputs(self.case, self.inputs.np, op)

    @staticmethod
    def convert(out):
        return to_float64(out)

    @staticmethod
    def compare(out, ref, tol):
        return compare(out, ref, tol)

    def before_backend(self, backend: Backend) -> None:
        pass


class _DeviceMode(_HostMode):
    """``parity.device``: inputs drawn on the torch device (shared by the cases of a shape),
    the float64 torch reference there, outputs compared there."""

    reference = "torch"

    def __init__(self, case: Case, device, inputs):
        from parity import device as dev
        self._dev = dev
        self.case = case
        self.inputs = inputs if inputs is not None else dev.DeviceInputs(case, device)

    @property
    def device(self) -> str:
        return self.inputs.device

    def reference_outputs(self, op: str) -> dict:
        return self._dev.reference_outputs_torch(self.case, self.inputs, op)

    def convert(self, out):
        return self._dev.to_device_tensor(out, self.inputs.device)

    def compare(self, out, ref, tol):
        return self._dev.compare_tensors(out, ref, tol)

    def before_backend(self, backend: Backend) -> None:
        # JAX allocates from its own pool: give it the blocks torch's allocator keeps cached
        if backend.framework == "jax" and self.inputs.device == "cuda":
            import torch
            torch.cuda.empty_cache()


def reference_mode(reference: str | None, device: str | None, backends=(),
                   inputs: Inputs | None = None) -> str:
    """Which float64 reference a run uses: "numpy" (host: numpy inputs and gg_spec.reference)
    or "torch" (device: ``parity.device``). ``reference``: auto | numpy | torch (default: the
    PARITY_REFERENCE environment variable, else auto). auto is torch when the torch device is
    cuda and numpy otherwise (and numpy, without importing torch, when every backend is a
    numpy one). Given ``inputs`` decide: DeviceInputs means torch."""
    if inputs is not None:
        return getattr(inputs, "reference", "numpy")
    if reference is None:
        reference = os.environ.get("PARITY_REFERENCE") or "auto"
    if reference not in ("auto", "numpy", "torch"):
        raise ValueError(f"reference must be auto, numpy or torch, got {reference!r}")
    if reference != "auto":
        return reference
    if backends and all(get_backend(b).framework == "numpy" for b in backends):
        return "numpy"
    return "torch" if resolve_device(device) == "cuda" else "numpy"


def _compare_outputs(report: Report, mode: _HostMode, backend: Backend, op: str, outs: dict,
                     refs: dict, case: Case, tol: float) -> dict:
    """Add one OutputRow per expected output; return the converted outputs (float64 numpy in
    host mode, device tensors in device mode) for the agreements."""
    converted = {}
    for name, ref in refs.items():
        if name not in outs:
            report.rows.append(OutputRow(backend.name, op, name, float("inf"), float("inf"),
                                         tol, False, note="missing output"))
            continue
        try:
            out, dtype = mode.convert(outs[name])
        except Exception as e:  # noqa: BLE001 - an unconvertible output is a finding
            report.rows.append(OutputRow(backend.name, op, name, float("inf"), float("inf"),
                                         tol, False, note=str(e) if isinstance(e, TypeError)
                                         else _short(e)))
            continue
        try:
            rel, mx, ok, note = mode.compare(out, ref, tol)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory on the device
            rel, mx, ok, note = float("inf"), float("inf"), False, f"compare: {_short(e)}"
        if ok and backend.checks_dtype and dtype != case.dtype:
            ok, note = False, f"dtype {dtype}, expected {case.dtype}"
        report.rows.append(OutputRow(backend.name, op, name, rel, mx, tol, ok, dtype, note))
        converted[name] = out
    extra = sorted(set(outs) - set(refs))
    if extra:
        report.rows.append(OutputRow(backend.name, op, ",".join(extra), float("inf"),
                                     float("inf"), tol, False, note="unexpected outputs"))
    return converted


def _call(run: BackendRun, backend: Backend, case: Case, inputs: Inputs, op: str):
    """backend.run, timed; a Skip, Unavailable or any exception is recorded in `run`
    (returns None then)."""
    t0 = time.perf_counter()
    try:
        backend.check_applies(case, op)
        outs = backend.run(case, inputs, op)
        if not isinstance(outs, dict):
            raise TypeError(f"{backend.name}.run returned {type(outs).__name__}, not a dict "
                            f"of outputs")
        return outs
    except Skip as e:
        run.status, run.reason = "skipped", str(e)
    except Unavailable as e:
        run.status, run.reason = "unavailable", str(e)
    except Exception as e:  # noqa: BLE001 - a crashing backend is a finding, not a crash
        run.status, run.reason, run.traceback = "error", _short(e), traceback.format_exc()
    finally:
        run.seconds = time.perf_counter() - t0
    return None


def _available(report: Report, backends, case: Case, required: bool) -> list[Backend]:
    """The backends that can run here; the others get one run per op recording why not."""
    ready = []
    for backend in backends:
        try:
            backend.check_available()
        except Exception as e:  # noqa: BLE001 - Unavailable, or a bug in the check itself
            status = "unavailable" if isinstance(e, Unavailable) else "error"
            reason = str(e) if isinstance(e, Unavailable) else _short(e)
            for op in case.ops:
                report.runs.append(BackendRun(backend.name, op, status, reason,
                                              required=required))
            continue
        ready.append(backend)
    return ready


def _run_op(report: Report, mode: _HostMode, backends, case: Case, op: str, pairs,
            required: bool, tol: float) -> None:
    """One op: its reference, every backend against it, the pairs against each other. One op
    at a time, so at most one reference and the outputs of paired backends are alive (a
    real-model dW reference is [E, N, K] float64: gigabytes)."""
    inputs = mode.inputs
    try:
        refs = mode.reference_outputs(op)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail this op, not the sweep
        reason, tb = f"float64 reference failed: {_short(e)}", traceback.format_exc()
        for backend in backends:
            report.runs.append(BackendRun(backend.name, op, "error", reason,
                                          required=required, traceback=tb))
        return
    paired = {name for pair in pairs for name in pair}
    kept = {}
    for backend in backends:
        run = BackendRun(backend.name, op, "ok", required=required)
        report.runs.append(run)
        mode.before_backend(backend)
        outs = _call(run, backend, case, inputs, op)
        changed = inputs.changed_inputs()
        if changed:
            # Later backends would see different numbers: fail the culprit loudly and hand
            # the next ones fresh copies.
            run.status, run.reason = "error", f"modified its inputs {changed}"
            inputs.reset()
        if outs is not None:
            converted = _compare_outputs(report, mode, backend, op, outs, refs, case, tol)
            if backend.name in paired:
                kept[backend.name] = converted
            del converted
        del outs
    del refs
    for a, b in pairs:
        if a not in kept or b not in kept:
            continue
        for name in (n for n in kept[a] if n in kept[b]):
            try:
                rel, mx, ok, note = mode.compare(kept[a][name], kept[b][name], tol)
            except Exception as e:  # noqa: BLE001
                rel, mx, ok, note = float("inf"), float("inf"), False, f"compare: {_short(e)}"
            report.agreements.append(Agreement(a, b, op, name, rel, mx, tol, ok, note))


def _in_run_order(report: Report, backends, pairs, ops) -> None:
    """Runs, rows and agreements in backend (pair) order, then op order, whatever order they
    were produced in."""
    where = {name: i for i, name in enumerate(backends)}
    pair_at = {tuple(p): i for i, p in enumerate(pairs)}
    op_at = {op: i for i, op in enumerate(ops)}
    report.runs.sort(key=lambda r: (where.get(r.backend, len(where)), op_at.get(r.op, 0)))
    report.rows.sort(key=lambda r: (where.get(r.backend, len(where)), op_at.get(r.op, 0)))
    report.agreements.sort(key=lambda a: (pair_at.get((a.a, a.b), 0), op_at.get(a.op, 0)))


def run(case: Case, backends=None, *, ops=None, pairs=None, device: str | None = None,
        inputs: Inputs | None = None, strict: bool | None = None,
        reference: str | None = None) -> Report:
    """Run `case` through `backends` (names or Backend objects; default: every default
    backend) for ``ops`` (default ``case.ops``).

    ``pairs``: (a, b) backend names whose outputs must agree with each other (default:
    triton_gg with each pallas_gg variant present). ``device``: auto | cpu | cuda for the
    torch and JAX inputs. ``strict``: whether an unavailable backend fails the report;
    default True when backends are named (you asked for them), False for the default list.
    ``reference``: auto | numpy | torch (see ``reference_mode``): numpy draws the inputs in
    numpy and compares against gg_spec's reference on the host; torch draws them on the torch
    device and computes the float64 reference and the comparisons there (``parity.device``);
    auto picks torch on a GPU.
    """
    if not isinstance(case, Case):
        case = Case.from_spec(case)
    if ops is not None:
        case = case.with_ops(ops)
    required = (backends is not None) if strict is None else strict
    names = backends if backends is not None else list(DEFAULT_BACKENDS)
    chosen = [get_backend(b) for b in names]
    t0 = time.perf_counter()
    mode_name = reference_mode(reference, device, chosen, inputs)
    mode = (_DeviceMode if mode_name == "torch" else _HostMode)(case, device, inputs)
    tol = tolerance(case.dtype)
    report = Report(case, [b.name for b in chosen])
    report.reference = mode.reference
    if pairs is None:
        pairs = default_pairs(report.backends)
    pairs = tuple(tuple(p) for p in pairs)
    ready = _available(report, chosen, case, required)
    for op in case.ops:
        _run_op(report, mode, ready, case, op, pairs, required, tol)
    _in_run_order(report, report.backends, pairs, case.ops)
    report.seconds = time.perf_counter() - t0
    report.device = mode.device
    return report


def assert_agrees(report: Report) -> Report:
    """Raise AssertionError with the report's table and failures unless it passed."""
    if not report.passed:
        raise AssertionError("parity failed:\n" + "\n".join(report.failures()) + "\n\n"
                             + report.table())
    return report


def check(case: Case, backend, ops=None, *, pairs=(), device: str | None = None,
          allow_skip: bool = False, reference: str | None = None) -> Report:
    """Run one backend (name or Backend) on `case` and assert it matches the float64 reference
    in every output of every op. An unavailable backend fails; so does one that ran no op at
    all (every op skipped), unless ``allow_skip``. Returns the report."""
    b = get_backend(backend)
    report = run(case, [b], ops=ops, pairs=pairs, device=device, reference=reference)
    assert_agrees(report)
    if not allow_skip and not report.ran(b.name):
        raise AssertionError(f"{b.name} ran no op of {report.case.id}: nothing was "
                             f"compared\n{report.table()}")
    return report


__all__ = ["assert_agrees", "check", "compare", "default_pairs", "reference_mode", "run"]
