"""What one harness run found: per backend and op a run status, per output its errors
against the float64 reference, and the agreement of backend pairs; rendered as a table, as
one summary line per op, or as JSON.

Pass/fail rules (``Report.passed``):

* an output fails when ``||out - ref|| / ||ref||`` exceeds ``gg_spec.tolerance(dtype)``, when
  it is not finite, has the wrong shape, is missing, or comes back in another dtype than the
  case's (the contract: outputs in the input dtype);
* a backend that raised fails; so does one that wrote into its inputs;
* a pair (triton_gg vs pallas_gg by default) fails when their outputs differ by more than
  ``tolerance(dtype)`` relative to the second one;
* an *unavailable* backend (package missing, import failing, function missing) fails only when
  it was asked for by name (``backends=[...]``, ``--backends``); in the default list it is shown
  and ignored, so the default command passes on a machine that lacks one framework;
* a *skipped* backend (it does not apply: an external reference on a fused case) never fails.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

DIRECT_OPS = ("forward", "dX", "dW")


@dataclass
class TypedArray:
    """A float64 array standing for an output of dtype ``dtype`` (used by test backends that
    alter outputs on the host but must keep reporting the original dtype)."""

    array: np.ndarray
    dtype: str


def to_float64(a) -> tuple[np.ndarray, str]:
    """(float64 numpy copy, dtype name) of a numpy array, torch tensor or JAX array."""
    if isinstance(a, TypedArray):
        return np.asarray(a.array, dtype=np.float64), a.dtype
    if isinstance(a, np.ndarray):
        return a.astype(np.float64), str(a.dtype)
    if "torch" in sys.modules:
        import torch
        if isinstance(a, torch.Tensor):
            # bf16/fp16 -> float64 is exact
            return (a.detach().to(device="cpu", dtype=torch.float64).numpy(),
                    str(a.dtype).replace("torch.", ""))
    if "jax" in sys.modules:
        import jax
        import jax.numpy as jnp
        if isinstance(a, jax.Array):
            name = str(a.dtype)
            host = np.asarray(jax.device_get(a.astype(jnp.float32) if name in
                                             ("bfloat16", "float16") else a))
            return host.astype(np.float64), name
    raise TypeError(f"cannot convert output of type {type(a).__name__} to numpy")


def output_label(op: str, output: str) -> str:
    """Y, dX, dW for the direct ops; autograd.<name> for the differentiable op."""
    return output if op in DIRECT_OPS else f"{op}.{output}"


@dataclass
class BackendRun:
    """One backend on one op: status ok | skipped | unavailable | error."""

    backend: str
    op: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    required: bool = False       # named explicitly: unavailable counts as a failure
    traceback: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "error" or (self.status == "unavailable" and self.required)


@dataclass
class OutputRow:
    """One output of one backend against the float64 reference."""

    backend: str
    op: str
    output: str
    rel_error: float
    max_abs_error: float
    tolerance: float
    passed: bool
    dtype: str = ""
    note: str = ""

    @property
    def label(self) -> str:
        return output_label(self.op, self.output)


@dataclass
class Agreement:
    """Two backends on one output: rel_error = ||a - b|| / ||b||."""

    a: str
    b: str
    op: str
    output: str
    rel_error: float
    max_abs_error: float
    tolerance: float
    passed: bool
    note: str = ""

    @property
    def label(self) -> str:
        return output_label(self.op, self.output)


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else ("nan" if math.isnan(v) else f"{v:.2e}")


@dataclass
class Report:
    """Everything one ``parity.run(case)`` found."""

    case: object
    backends: list[str]
    runs: list[BackendRun] = field(default_factory=list)
    rows: list[OutputRow] = field(default_factory=list)
    agreements: list[Agreement] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    reference: str = "numpy"     # numpy: gg_spec on the host; torch: float64 on `device`

    # ------------------------------------------------------------------ verdicts

    @property
    def passed(self) -> bool:
        return not self.failures()

    def failures(self) -> list[str]:
        """One line per failing run, output row or agreement."""
        out = [f"{r.backend} {r.op}: {r.status}: {r.reason}" for r in self.runs if r.failed]
        out += [f"{r.backend} {r.label}: rel error {_fmt(r.rel_error)} > {r.tolerance:.0e}"
                + (f" ({r.note})" if r.note else "") for r in self.rows if not r.passed]
        out += [f"{a.a} vs {a.b} {a.label}: disagree, rel {_fmt(a.rel_error)} > "
                f"{a.tolerance:.0e}" + (f" ({a.note})" if a.note else "")
                for a in self.agreements if not a.passed]
        return out

    def status(self, backend: str, op: str) -> BackendRun | None:
        for r in self.runs:
            if r.backend == backend and r.op == op:
                return r
        return None

    def ran(self, backend: str) -> bool:
        """Whether `backend` produced outputs for at least one op."""
        return any(r.backend == backend and r.status == "ok" for r in self.runs)

    def worst(self, backend: str, op: str) -> float | None:
        """Largest rel error of `backend` over the outputs of `op` (None: no outputs)."""
        errs = [r.rel_error for r in self.rows if r.backend == backend and r.op == op]
        return max(errs) if errs else None

    # ------------------------------------------------------------------ rendering

    def table(self) -> str:
        """Backend x output: rel error, max abs error, result; then the agreements."""
        case = self.case
        tol = self.rows[0].tolerance if self.rows else None
        head = f"== {case.id}  [{case.describe}; device {self.device}"
        if self.reference != "numpy":
            head += f"; {self.reference} float64 reference"
        head += f"; tol {tol:.0e}]" if tol is not None else "]"
        lines = [head, f"   {'backend':<20} {'output':<26} {'rel_err':>9} {'max_abs':>9}  result"]
        for backend in self.backends:
            lines += self._backend_lines(backend)
        for a in self.agreements:
            res = "ok" if a.passed else "DISAGREE"
            who = f"{a.a}~{a.b}"
            lines.append(f"   {who:<20} {a.label:<26} {_fmt(a.rel_error):>9} "
                         f"{_fmt(a.max_abs_error):>9}  {res}" + (f" ({a.note})" if a.note else ""))
        verdict = "PASS" if self.passed else f"FAIL ({len(self.failures())} problems)"
        lines.append(f"   -> {verdict} in {self.seconds:.2f} s")
        return "\n".join(lines)

    def _backend_lines(self, backend: str) -> list[str]:
        runs = [r for r in self.runs if r.backend == backend]
        not_ok = [r for r in runs if r.status != "ok"]
        lines = []
        # one line when every op of a backend shares a status and reason (e.g. unavailable)
        if runs and len(not_ok) == len(runs) and len({(r.status, r.reason) for r in runs}) == 1:
            r = runs[0]
            mark = "  FAIL" if r.failed else ""
            return [f"   {backend:<20} {'(all ops)':<26} {r.status}: {r.reason}{mark}"]
        for r in runs:
            if r.status != "ok":
                mark = "  FAIL" if r.failed else ""
                lines.append(f"   {backend:<20} {r.op:<26} {r.status}: {r.reason}{mark}")
                continue
            for row in (x for x in self.rows if x.backend == backend and x.op == r.op):
                res = "ok" if row.passed else "FAIL"
                note = f" ({row.note})" if row.note else ""
                lines.append(f"   {backend:<20} {row.label:<26} {_fmt(row.rel_error):>9} "
                             f"{_fmt(row.max_abs_error):>9}  {res}{note}")
        return lines

    def summary_lines(self) -> list[str]:
        """One line per op: the case, PASS/FAIL and each backend's worst rel error."""
        c = self.case
        lines = []
        for op in c.ops:
            cells, ok = [], True
            for b in self.backends:
                r = self.status(b, op)
                if r is None:
                    continue
                if r.status != "ok":
                    short = {"skipped": "n/a", "unavailable": "unavail", "error": "ERROR"}
                    cells.append(f"{b}={short[r.status]}")
                    ok &= not r.failed
                    continue
                bad = [x for x in self.rows if x.backend == b and x.op == op and not x.passed]
                worst = self.worst(b, op)
                value = _fmt(worst) if worst is not None else "-"
                cells.append(f"{b}={'FAIL:' if bad else ''}{value}")
                ok &= not bad
            agree = [a for a in self.agreements if a.op == op]
            for a_name, b_name in dict.fromkeys((a.a, a.b) for a in agree):
                worst = max(a.rel_error for a in agree if (a.a, a.b) == (a_name, b_name))
                cells.append(f"{a_name}~{b_name}={_fmt(worst)}")
            bad_agree = [a for a in agree if not a.passed]
            if bad_agree:
                ok = False
                cells.append("DISAGREE:" + ",".join(f"{a.a}~{a.b}.{a.output}" for a in bad_agree))
            lines.append(f"{'PASS' if ok else 'FAIL'}  {c.shape.name:<18} T={c.tokens:<4} "
                         f"k={c.topk} {c.dtype:<8} {c.routing:<13} {c.fusion.name:<14} "
                         f"{op:<8} " + "  ".join(cells))
        return lines

    def to_dict(self) -> dict:
        """JSON-ready; inf/nan become the strings "inf"/"nan" (strict JSON has neither)."""
        return _json_safe({
            "case": self.case.to_dict(),
            "device": self.device,
            "reference": self.reference,
            "backends": self.backends,
            "passed": self.passed,
            "failures": self.failures(),
            "seconds": self.seconds,
            "runs": [asdict(r) for r in self.runs],
            "outputs": [{**asdict(r), "label": r.label} for r in self.rows],
            "agreements": [{**asdict(a), "label": a.label} for a in self.agreements],
        })


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


__all__ = ["Agreement", "BackendRun", "OutputRow", "Report", "TypedArray", "output_label",
           "to_float64"]
