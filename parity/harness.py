"""``run(case)``: one case through every backend against gg_spec's float64 reference.

The inputs are generated once (``gg_spec.cases.make_inputs``) and handed to every backend;
the reference is computed once per op; each backend's outputs are compared with it, and the
outputs of backend pairs (triton_gg vs pallas_gg by default) with each other.
``check`` and ``assert_agrees`` are the helpers for the test suites of triton_gg and pallas_gg.
"""

from __future__ import annotations

import math
import time
import traceback

import numpy as np

from gg_spec.tolerances import max_abs_error, rel_error, tolerance
from parity.backends import (DEFAULT_BACKENDS, Backend, Skip, Unavailable, get_backend,
                             reference_outputs)
from parity.case import Case
from parity.inputs import Inputs
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


def _compare_outputs(report: Report, backend: Backend, op: str, outs: dict, refs: dict,
                     case: Case, tol: float) -> dict[str, np.ndarray]:
    """Add one OutputRow per expected output; return the float64 outputs for agreements."""
    converted = {}
    for name, ref in refs.items():
        if name not in outs:
            report.rows.append(OutputRow(backend.name, op, name, float("inf"), float("inf"),
                                         tol, False, note="missing output"))
            continue
        try:
            out, dtype = to_float64(outs[name])
        except TypeError as e:
            report.rows.append(OutputRow(backend.name, op, name, float("inf"), float("inf"),
                                         tol, False, note=str(e)))
            continue
        rel, mx, ok, note = compare(out, ref, tol)
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


def _run_backend(report: Report, backend: Backend, case: Case, inputs: Inputs, refs: dict,
                 required: bool, tol: float) -> dict:
    """Run every op of `case` on one backend; returns {op: {output: float64 array}}."""
    results = {}
    try:
        backend.check_available()
    except Exception as e:  # noqa: BLE001 - Unavailable, or a bug in the check itself
        status = "unavailable" if isinstance(e, Unavailable) else "error"
        reason = str(e) if isinstance(e, Unavailable) else _short(e)
        for op in case.ops:
            report.runs.append(BackendRun(backend.name, op, status, reason, required=required))
        return results
    for op in case.ops:
        run = BackendRun(backend.name, op, "ok", required=required)
        report.runs.append(run)
        outs = _call(run, backend, case, inputs, op)
        changed = inputs.changed_inputs()
        if changed:
            # Later backends would see different numbers: fail the culprit loudly and hand
            # the next ones fresh copies.
            run.status, run.reason = "error", f"modified its inputs {changed}"
            inputs.reset()
        if outs is not None:
            results[op] = _compare_outputs(report, backend, op, outs, refs[op], case, tol)
    return results


def _agreements(report: Report, results: dict, pairs, case: Case, tol: float) -> None:
    for a, b in pairs:
        if a not in results or b not in results:
            continue
        for op in case.ops:
            outs_a, outs_b = results[a].get(op, {}), results[b].get(op, {})
            for name in (n for n in outs_a if n in outs_b):
                rel, mx, ok, note = compare(outs_a[name], outs_b[name], tol)
                report.agreements.append(Agreement(a, b, op, name, rel, mx, tol, ok, note))


def run(case: Case, backends=None, *, ops=None, pairs=None, device: str | None = None,
        inputs: Inputs | None = None, strict: bool | None = None) -> Report:
    """Run `case` through `backends` (names or Backend objects; default: every default
    backend) for ``ops`` (default ``case.ops``).

    ``pairs``: (a, b) backend names whose outputs must agree with each other (default:
    triton_gg with each pallas_gg variant present). ``device``: auto | cpu | cuda for the
    torch and JAX inputs. ``strict``: whether an unavailable backend fails the report;
    default True when backends are named (you asked for them), False for the default list.
    """
    if not isinstance(case, Case):
        case = Case.from_spec(case)
    if ops is not None:
        case = case.with_ops(ops)
    required = (backends is not None) if strict is None else strict
    names = backends if backends is not None else list(DEFAULT_BACKENDS)
    chosen = [get_backend(b) for b in names]
    t0 = time.perf_counter()
    inputs = inputs or Inputs(case, device)
    tol = tolerance(case.dtype)
    refs = {op: reference_outputs(case, inputs.np, op) for op in case.ops}
    report = Report(case, [b.name for b in chosen])
    if pairs is None:
        pairs = default_pairs(report.backends)
    results = {b.name: _run_backend(report, b, case, inputs, refs, required, tol)
               for b in chosen}
    _agreements(report, results, pairs, case, tol)
    report.seconds = time.perf_counter() - t0
    # which device the torch/JAX inputs lived on (only resolved if a framework ran)
    report.device = inputs._device or "cpu"
    return report


def assert_agrees(report: Report) -> Report:
    """Raise AssertionError with the report's table and failures unless it passed."""
    if not report.passed:
        raise AssertionError("parity failed:\n" + "\n".join(report.failures()) + "\n\n"
                             + report.table())
    return report


def check(case: Case, backend, ops=None, *, pairs=(), device: str | None = None,
          allow_skip: bool = False) -> Report:
    """Run one backend (name or Backend) on `case` and assert it matches the float64 reference
    in every output of every op. An unavailable backend fails; so does one that ran no op at
    all (every op skipped), unless ``allow_skip``. Returns the report."""
    b = get_backend(backend)
    report = run(case, [b], ops=ops, pairs=pairs, device=device)
    assert_agrees(report)
    if not allow_skip and not report.ran(b.name):
        raise AssertionError(f"{b.name} ran no op of {report.case.id}: nothing was "
                             f"compared\n{report.table()}")
    return report


__all__ = ["assert_agrees", "check", "compare", "default_pairs", "run"]
