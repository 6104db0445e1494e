"""parity: the harness itself (against the numpy and torch backends, every fusion), proof
that it catches a wrong backend, the command line, and triton_gg / pallas_gg through it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import parity
from gg_spec.cases import FUSIONS, edge_cases
from parity import Case, Perturbed
from parity.backends import Backend, Skip, Unavailable

REPO = Path(__file__).resolve().parents[1]
REFS = ["numpy", "torch"]


def case_for(fusion: str, dtype: str = "float32", **kw) -> Case:
    """tiny_odd (K, N dividing no block; empty experts) with the GEMM that owns `fusion`."""
    second = "permute_y" in fusion or "mul" in fusion
    kw = {"tokens": 13, "routing": "empty_experts", **kw}
    return Case.from_preset("tiny_odd", "second" if second else "first", dtype=dtype,
                            fusion=fusion, **kw)


@pytest.fixture
def registered():
    """Register test backends for one test; removes them afterwards."""
    names = []

    def add(backend, default=False):
        parity.register_backend(backend, default=default, replace=True)
        names.append(backend.name)
        return backend
    yield add
    for n in names:
        parity.unregister_backend(n)


def run_cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "parity", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- the harness on numpy / torch

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_numpy_and_torch_pass_every_fusion(fusion, dtype):
    report = parity.assert_agrees(parity.run(case_for(fusion, dtype), REFS))
    ops = {r.op for r in report.rows}
    assert ops == set(parity.OPS)
    # the reference against itself is exact; plain torch is within the dtype's budget
    assert all(r.rel_error == 0.0 for r in report.rows if r.backend == "numpy")
    torch_rows = [r for r in report.rows if r.backend == "torch"]
    labels = {r.label for r in torch_rows}
    assert {"Y", "dX", "dW", "autograd.Y", "autograd.dX_total", "autograd.dW"} <= labels
    assert ("autograd.d_topk_weights" in labels) == ("mul" in fusion)
    assert all(r.dtype == dtype for r in torch_rows)


@pytest.mark.parametrize("case", edge_cases(), ids=lambda c: c.id)
def test_edge_cases_numpy_and_torch(case):
    """Zero tokens, one token, all rows on one expert, empty experts, top-k 1."""
    parity.assert_agrees(parity.run(case, REFS))


def test_torch_backend_is_exact_in_float32_up_to_rounding():
    """fp32 accumulation on upcast inputs: the torch reference is near machine precision."""
    report = parity.run(case_for("permute_y+mul"), REFS)
    assert max(r.rel_error for r in report.rows) < 1e-6


# ---------------------------------------------------------------- it catches wrong backends

@pytest.mark.parametrize("how,fusion,dtype", [
    ("noise", "permute_x", "float32"),
    ("drop_row", "plain", "float32"),
    ("swap_rows", "permute_y+mul", "float32"),
    ("nan", "mul", "float32"),
    ("dtype", "permute_y", "bfloat16"),
])
def test_harness_catches_a_perturbed_backend(registered, how, fusion, dtype):
    bad = registered(Perturbed("torch", f"torch_{how}", how, scale=1e-2))
    report = parity.run(case_for(fusion, dtype), ["numpy", bad.name])
    assert not report.passed
    failing = [r for r in report.rows if not r.passed]
    assert failing and all(r.backend == bad.name for r in failing)
    # every output of every op is damaged, so every one must be flagged
    assert len(failing) == len([r for r in report.rows if r.backend == bad.name])
    with pytest.raises(AssertionError, match=bad.name):
        parity.assert_agrees(report)
    with pytest.raises(AssertionError):
        parity.check(case_for(fusion, dtype), bad)


def test_threshold_is_the_dtype_tolerance(registered):
    """Noise of 0.3x the fp32 budget passes, 3x fails: the pass line is tolerance(dtype)."""
    case = case_for("plain")
    small = registered(Perturbed("torch", "torch_small_noise", "noise", scale=3e-5))
    large = registered(Perturbed("torch", "torch_large_noise", "noise", scale=3e-4))
    assert parity.run(case, [small.name]).passed
    assert not parity.run(case, [large.name]).passed


def test_pair_disagreement_is_caught(registered):
    """Two backends each within tolerance of the reference but on opposite sides of it
    (0.7x the budget each way) disagree by 1.4x: the pair check must flag it."""
    case = case_for("mul")
    a = registered(Perturbed("torch", "plus", "noise", scale=0.7e-4))
    b = registered(Perturbed("torch", "minus", "noise", scale=-0.7e-4))
    report = parity.run(case, [a.name, b.name], pairs=[("plus", "minus")])
    assert all(r.passed for r in report.rows)
    assert report.agreements and not any(x.passed for x in report.agreements)
    assert not report.passed
    assert "disagree" in "\n".join(report.failures())
    assert "DISAGREE" in report.table()


class Raising(Backend):
    name, framework = "raising", "numpy"

    def run(self, case, inputs, op):
        raise RuntimeError("kernel exploded")


class Mutating(Backend):
    """Returns the right numbers but writes into its X input (a classic in-place bug)."""

    name, framework = "mutating", "torch"

    def run(self, case, inputs, op):
        out = parity.get_backend("torch").run(case, inputs, op)
        inputs.torch("x").mul_(2)
        return out


class Missing(Backend):
    name, framework = "not_here", "numpy"

    def check_available(self):
        raise Unavailable("no module named not_here")


class NotApplicable(Backend):
    name, framework = "never_applies", "numpy"

    def check_applies(self, case, op):
        raise Skip("only for other cases")


def test_raising_backend_fails_with_reason(registered):
    registered(Raising())
    report = parity.run(case_for("plain"), ["numpy", "raising"])
    assert not report.passed
    run = report.status("raising", "forward")
    assert run.status == "error" and "kernel exploded" in run.reason and run.traceback


def test_backend_that_modifies_inputs_fails_and_later_backends_see_clean_inputs(registered):
    registered(Mutating())
    report = parity.run(case_for("plain"), ["mutating", "torch"])
    assert report.status("mutating", "forward").status == "error"
    assert "modified its inputs" in report.status("mutating", "forward").reason
    assert all(r.passed for r in report.rows if r.backend == "torch")


def test_unavailable_fails_only_when_requested(registered):
    registered(Missing())
    case = case_for("plain", ops=("forward",))
    requested = parity.run(case, ["numpy", "not_here"])
    assert not requested.passed and "unavailable" in requested.failures()[0]
    # as for the default list (strict=False): shown, not a failure
    by_default = parity.run(case, ["numpy", "not_here"], strict=False)
    assert by_default.passed
    assert by_default.status("not_here", "forward").status == "unavailable"
    assert "not_here" in by_default.table()
    assert not any(r.backend == "not_here" and r.failed for r in by_default.runs)


def test_skipped_is_not_a_failure_but_check_wants_a_run(registered):
    registered(NotApplicable())
    case = case_for("plain", ops=("forward",))
    report = parity.run(case, ["numpy", "never_applies"])
    assert report.passed and report.status("never_applies", "forward").status == "skipped"
    with pytest.raises(AssertionError, match="ran no op"):
        parity.check(case, "never_applies")
    parity.check(case, "never_applies", allow_skip=True)


def test_report_json_is_strict_json(registered):
    registered(Perturbed("torch", "torch_drop", "drop_row"))
    report = parity.run(case_for("plain", ops=("forward",)), ["numpy", "torch_drop"])
    text = json.dumps(report.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert back["passed"] is False and back["outputs"][-1]["rel_error"] == "inf"
    assert "shape" in back["outputs"][-1]["note"]


# ---------------------------------------------------------------- external references

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gemm", ["first", "second"])
def test_torch_grouped_mm_on_plain_cases(gemm, dtype):
    case = Case.from_preset("tiny", gemm, 16, dtype=dtype, routing="empty_experts")
    report = parity.check(case, "torch_grouped_mm")
    assert report.ran("torch_grouped_mm")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gemm", ["first", "second"])
def test_lax_ragged_dot_on_plain_cases(gemm, dtype):
    pytest.importorskip("jax")
    case = Case.from_preset("tiny", gemm, 16, dtype=dtype, routing="skewed")
    parity.check(case, "lax_ragged_dot")


@pytest.mark.parametrize("backend", ["torch_grouped_mm", "lax_ragged_dot"])
def test_external_references_skip_fused_and_unaligned_cases(backend):
    if backend == "lax_ragged_dot":
        pytest.importorskip("jax")
    fused = parity.run(case_for("permute_x"), [backend])
    assert fused.passed and all(r.status == "skipped" for r in fused.runs)
    if backend == "torch_grouped_mm":
        # tiny_odd has N=38 fp32... rows of 19*4 bytes: not 16-byte aligned
        odd = parity.run(Case.from_preset("tiny_odd", "second", 8), [backend])
        assert all(r.status == "skipped" and "16-byte" in r.reason for r in odd.runs)


# ---------------------------------------------------------------- library API

def test_case_constructors():
    c = Case.from_preset("qwen3_30b_a3b", "second", 4, topk=2, fusion="permute_y+mul")
    assert (c.shape.num_experts, c.shape.n, c.shape.k, c.topk, c.m) == (128, 2048, 768, 2, 8)
    assert c.fusion == FUSIONS["permute_y+mul"]
    e = Case.explicit(6, 24, 40, 3, 5, fusion="mul", ops=("forward", "dW"))
    assert (e.shape.num_experts, e.shape.n, e.shape.k, e.topk) == (6, 24, 40, 3)
    assert not e.shape.is_first_gemm and e.ops == ("forward", "dW")
    assert Case.from_spec(edge_cases()[0]).id == edge_cases()[0].id
    for bad in (dict(dtype="int8"), dict(routing="zipf"), dict(fusion="permute_z"),
                dict(ops=("backward",)), dict(topk=99)):
        with pytest.raises(ValueError):
            Case.from_preset("tiny", "first", 4, **bad)


def test_make_cases_covers_each_gemms_fusions():
    cases = parity.make_cases(["tiny", "tiny_odd"], "both", 8)
    assert len(cases) == 2 * (2 + 4)
    assert {c.fusion.name for c in cases if c.shape.is_first_gemm} == {"plain", "permute_x"}
    assert len(parity.make_cases(["tiny"], "first", 8, fusions="all")) == 5


def test_numpy_and_torch_backends_do_not_import_jax():
    code = textwrap.dedent("""
        import sys, parity
        case = parity.Case.from_preset("tiny", "first", 4)
        parity.assert_agrees(parity.run(case, ["numpy"]))
        assert "torch" not in sys.modules and "jax" not in sys.modules, "numpy run imported"
        parity.assert_agrees(parity.run(case, ["numpy", "torch"]))
        assert "jax" not in sys.modules, "torch run imported jax"
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------- the command line

def test_cli_default_runs_every_backend_and_passes():
    """The README's main job: tiny preset, both GEMMs with their fusions, every backend."""
    out = run_cli()
    assert out.returncode == 0, out.stdout + out.stderr
    for backend in parity.DEFAULT_BACKENDS:
        assert backend in out.stdout
    assert "PASS: 6/6 cases passed" in out.stdout


def test_cli_sweep_passes(tmp_path):
    out = run_cli("--sweep", "--tokens", "8", "--backends",
                  "numpy,torch,torch_grouped_mm", "--json", str(tmp_path / "s.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads((tmp_path / "s.json").read_text())
    # tiny presets on CPU: 3 presets x (2 + 4) fusions, one line per op
    assert data["passed"] and len(data["reports"]) == 18
    assert sum(line.startswith("PASS ") for line in out.stdout.splitlines()) == 18 * 4


PLUGIN = """
import parity
parity.register_backend(parity.Perturbed("torch", "torch_noisy", "noise", scale=1e-2),
                        replace=True)
"""


def test_cli_exits_1_on_a_perturbed_backend(tmp_path):
    plugin = tmp_path / "broken_backends.py"
    plugin.write_text(PLUGIN)
    out = run_cli("--plugin", str(plugin), "--backends", "numpy,torch_noisy", "--gemm",
                  "second", "--ops", "forward,autograd", "--json", str(tmp_path / "r.json"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL" in out.stdout and "torch_noisy" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    # the same plugin, the honest backend: exit 0
    ok = run_cli("--plugin", str(plugin), "--backends", "numpy,torch", "--gemm", "second",
                 "--ops", "forward")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_cli_usage_errors_exit_2():
    assert run_cli("--backends", "numpy,no_such_backend").returncode == 2
    assert run_cli("--fusions", "permute_z").returncode == 2
    assert run_cli("--preset", "tiny", "--topk", "9").returncode == 2


def test_cli_sweep_picks_tiny_presets_on_cpu_and_real_ones_on_gpu():
    from parity import cli
    args = cli.build_parser().parse_args(["--sweep"])
    cpu_cases, _ = cli._cases(args, "cpu")
    assert {c.shape.name.rsplit("_", 1)[0] for c in cpu_cases} == {"tiny", "tiny_odd",
                                                                    "tiny_many"}
    gpu_cases, notes = cli._cases(args, "cuda")
    assert {c.tokens for c in gpu_cases} == {128}
    assert not any(c.shape.name.startswith("tiny") for c in gpu_cases)
    assert any("deepseek_v3" in n for n in notes)      # too big for the host reference
    args = cli.build_parser().parse_args(["--sweep", "--presets", "tiny", "--tokens", "4"])
    assert {c.shape.name for c in cli._cases(args, "cuda")[0]} == {"tiny_w1", "tiny_w2"}


# ---------------------------------------------------------------- triton_gg and pallas_gg

KERNEL_CASES = [case_for(f) for f in FUSIONS] + [
    case_for("permute_x", "bfloat16"), case_for("permute_y+mul", "bfloat16")]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
def test_triton_gg_matches_reference(case):
    pytest.importorskip("triton_gg")
    parity.check(case, "triton_gg")


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
def test_pallas_gg_matches_reference(case):
    pytest.importorskip("jax")
    pytest.importorskip("pallas_gg")
    parity.check(case, "pallas_gg")


@pytest.mark.parametrize("fusion", ["permute_x", "permute_y+mul"])
def test_triton_gg_and_pallas_gg_agree(fusion):
    pytest.importorskip("triton_gg")
    pytest.importorskip("jax")
    pytest.importorskip("pallas_gg")
    case = case_for(fusion, "bfloat16", routing="skewed", tokens=11)
    report = parity.assert_agrees(parity.run(case, ["triton_gg", "pallas_gg"]))
    assert report.agreements and all(math.isfinite(a.rel_error) for a in report.agreements)
    assert {a.op for a in report.agreements} == set(parity.OPS)


def test_backends_share_one_set_of_inputs():
    """Every framework sees the numbers gg_spec generated (bf16 casts are exact)."""
    case = case_for("permute_x", "bfloat16")
    inputs = parity.Inputs(case)
    for key in ("x", "w", "dy", "topk_weights"):
        assert np.array_equal(inputs.torch(key).float().numpy(), inputs.np[key])
    pytest.importorskip("jax")
    for key in ("x", "w", "gather_indices"):
        assert np.array_equal(np.asarray(inputs.jax(key)).astype(np.float64),
                              inputs.np[key].astype(np.float64))


# ---------------------------------------------------------------- device mode (parity.device)
# The GPU path (inputs drawn by torch on the device, float64 torch reference and comparisons
# there) run on CPU tensors: `reference="torch"` with `device="cpu"`.

DEV = {"device": "cpu", "reference": "torch"}


def _torch_reference(case, op):
    """parity.reference on torch CPU tensors of exactly gg_spec's inputs (make_inputs)."""
    from parity.device import reference_outputs_torch
    return reference_outputs_torch(case, parity.Inputs(case, "cpu"), op)


def _assert_references_equal(case):
    arrays = parity.Inputs(case).np
    for op in parity.OPS:
        want = parity.reference_outputs(case, arrays, op)
        got = _torch_reference(case, op)
        assert set(got) == set(want), (op, set(got), set(want))
        for name, ref in want.items():
            out = got[name]
            assert out.dtype == torch_float64() and tuple(out.shape) == ref.shape, (op, name)
            out = out.numpy()
            # same float64 math, only the BLAS summation order differs
            assert np.all((out == 0) == (ref == 0)), (op, name, "zero pattern")
            rel, _, _, _ = parity.compare(out, ref, 0.0)
            assert rel < 1e-13, (case.id, op, name, rel)


def torch_float64():
    import torch
    return torch.float64


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_torch_reference_equals_gg_spec_reference(fusion):
    """The device-mode ground truth (parity.reference) is gg_spec's, on every fusion:
    fp32 and bf16 inputs, top-k 1 and 3, empty experts and skewed routing."""
    for dtype, kw in (("float32", {}), ("bfloat16", {"routing": "skewed", "tokens": 7}),
                      ("float32", {"topk": 1, "tokens": 6})):
        _assert_references_equal(case_for(fusion, dtype, **kw))


def test_torch_reference_equals_gg_spec_reference_on_edge_cases():
    """Zero tokens, one token, all rows on one expert, empty experts, top-k 1."""
    for case in edge_cases():
        _assert_references_equal(Case.from_spec(case))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_device_mode_every_fusion(fusion, dtype):
    report = parity.assert_agrees(parity.run(case_for(fusion, dtype), REFS, **DEV))
    assert report.reference == "torch" and report.device == "cpu"
    assert {r.op for r in report.rows} == set(parity.OPS)
    # numpy (gg_spec on host copies of the device inputs) against the torch reference
    assert all(r.rel_error < 1e-13 for r in report.rows if r.backend == "numpy")
    assert all(r.dtype == dtype for r in report.rows if r.backend == "torch")
    assert "torch float64 reference" in report.table()


@pytest.mark.parametrize("case", edge_cases()[::2], ids=lambda c: c.id)
def test_device_mode_edge_cases(case):
    parity.assert_agrees(parity.run(case, REFS, **DEV))


def test_device_inputs_drawn_once_per_shape_and_reproducible():
    from parity.device import DeviceInputs, clear_cache
    clear_cache()
    first = [case_for(f, "bfloat16") for f in ("plain", "permute_x")]
    a, b = (DeviceInputs(c, "cpu") for c in first)
    # one W (and dY) for both fusions of the shape: same buffer, drawn once
    assert a.torch("w").data_ptr() == b.torch("w").data_ptr()
    assert a.torch("dy").data_ptr() == b.torch("dy").data_ptr()
    assert tuple(a.torch("x").shape) == (a.case.m, a.case.shape.k)
    assert tuple(b.torch("x").shape) == (b.case.tokens, b.case.shape.k)   # permute_x: [T, K]
    w = a.torch("w")
    e, n, k = a.case.shape.num_experts, a.case.shape.n, a.case.shape.k
    assert str(w.dtype) == "torch.bfloat16" and tuple(w.shape) == (e, n, k)
    assert abs(float(w.float().std()) * math.sqrt(k) - 1.0) < 0.1      # scaled 1/sqrt(K)
    # the routing is gg_spec's, exactly as the host mode draws it
    host = parity.Inputs(first[0]).np
    for key in ("m_sizes", "gather_indices", "topk_ids", "topk_weights"):
        assert np.array_equal(a.np[key], host[key]), key
        assert np.array_equal(a.torch(key).float().numpy(), host[key].astype(np.float32))
    # the host copies are the device values (exact in float32)
    assert np.array_equal(a.np["w"], w.float().numpy())
    # another shape evicts the cache; the same case redraws the same numbers
    saved = w.float().clone()
    DeviceInputs(case_for("mul", "bfloat16"), "cpu").torch("w")
    again = DeviceInputs(first[0], "cpu").torch("w")
    assert again.data_ptr() != w.data_ptr() and bool((again.float() == saved).all())
    clear_cache()


def test_device_mode_catches_wrong_backends(registered):
    case = case_for("permute_y+mul", "bfloat16")
    for how in ("noise", "swap_rows", "nan", "drop_row", "dtype"):
        bad = registered(Perturbed("torch", f"torch_{how}", how, scale=1e-1))
        report = parity.run(case, ["numpy", bad.name], **DEV)
        failing = [r for r in report.rows if not r.passed]
        assert len(failing) == len([r for r in report.rows if r.backend == bad.name]), how
        assert all(r.backend == bad.name for r in failing)
    a = registered(Perturbed("torch", "plus", "noise", scale=0.7e-4))
    b = registered(Perturbed("torch", "minus", "noise", scale=-0.7e-4))
    report = parity.run(case_for("mul"), [a.name, b.name], pairs=[("plus", "minus")], **DEV)
    assert all(r.passed for r in report.rows)
    assert report.agreements and not any(x.passed for x in report.agreements)


def test_device_mode_mutating_and_raising_backends(registered):
    registered(Mutating())
    registered(Raising())
    report = parity.run(case_for("plain"), ["mutating", "raising", "torch"], **DEV)
    assert "modified its inputs" in report.status("mutating", "forward").reason
    assert report.status("raising", "dX").status == "error"
    assert all(r.passed for r in report.rows if r.backend == "torch")
    # report order is backend-major, op order within, as in host mode
    assert [(r.backend, r.op) for r in report.runs][:2] == [("mutating", "forward"),
                                                            ("mutating", "dX")]


def test_device_mode_detects_writes_into_large_inputs_by_sample(monkeypatch):
    import torch

    from parity import device
    monkeypatch.setattr(device, "_EXACT_CHECK_MAX_ELEMS", 10)
    monkeypatch.setattr(device, "_SAMPLE_ELEMS", 64)
    t = torch.randn(40, 33).to(torch.bfloat16)
    p = device._Pristine(t)
    assert p.stride > 1 and p.unchanged(t)
    t[3:9].mul_(2)
    assert not p.unchanged(t)


def test_compare_tensors_matches_compare(monkeypatch):
    import torch

    from parity import device
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((9, 7))
    outs = [ref + 1e-3 * rng.standard_normal(ref.shape), ref.copy(), np.zeros_like(ref)]
    for chunk in (1 << 25, 5):          # one chunk, and many (the chunked accumulation)
        monkeypatch.setattr(device, "_COMPARE_CHUNK", chunk)
        for out in outs:
            got = device.compare_tensors(torch.from_numpy(out).to(torch.bfloat16),
                                         torch.from_numpy(ref), 1e-2)
            # the same numbers as the host comparison of the bf16 output
            want = parity.compare(torch.from_numpy(out).to(torch.bfloat16).double().numpy(),
                                  ref, 1e-2)
            assert got[2:] == want[2:]
            assert math.isclose(got[0], want[0], rel_tol=1e-12, abs_tol=1e-300)
            assert math.isclose(got[1], want[1], rel_tol=1e-12, abs_tol=1e-300)
        bad = torch.from_numpy(ref.copy())
        bad[2, 3] = float("nan")
        assert device.compare_tensors(bad, torch.from_numpy(ref), 1.0)[2:] == (
            False, "1 non-finite values")
        huge = torch.full((4, 3), 1e200, dtype=torch.float64)   # squares overflow
        rel, _, ok, _ = device.compare_tensors(huge * (1 + 1e-3), huge, 1e-2)
        assert ok and math.isclose(rel, 1e-3, rel_tol=1e-6)
    z = torch.zeros
    assert device.compare_tensors(z(0, 3), z(0, 3), 1e-4) == (0.0, 0.0, True, "")
    assert device.compare_tensors(torch.ones(2, 2), z(2, 2), 1e-4)[0] == math.inf
    assert device.compare_tensors(z(2, 2), z(2, 2), 1e-4)[:3] == (0.0, 0.0, True)
    assert "shape" in device.compare_tensors(z(2, 3), z(3, 2), 1.0)[3]


def test_reference_mode_choice(monkeypatch):
    monkeypatch.delenv("PARITY_REFERENCE", raising=False)
    assert parity.reference_mode(None, "cpu", ["torch"]) == "numpy"
    assert parity.reference_mode(None, "cuda", ["torch"]) == "torch"
    assert parity.reference_mode(None, "cuda", ["numpy"]) == "numpy"    # no torch needed
    assert parity.reference_mode("numpy", "cuda", ["torch"]) == "numpy"
    monkeypatch.setenv("PARITY_REFERENCE", "torch")
    assert parity.reference_mode(None, "cpu", ["torch"]) == "torch"
    with pytest.raises(ValueError):
        parity.reference_mode("float64", "cpu")


def test_device_mode_jax_backends_on_cpu():
    """JAX backends read the device inputs and their outputs come back through DLPack."""
    pytest.importorskip("jax")
    case = Case.from_preset("tiny", "second", 16, dtype="bfloat16", routing="skewed")
    parity.assert_agrees(parity.run(case, ["lax_ragged_dot", "torch_grouped_mm"], **DEV))


def test_triton_gg_and_pallas_gg_agree_in_device_mode():
    pytest.importorskip("triton_gg")
    pytest.importorskip("jax")
    pytest.importorskip("pallas_gg")
    case = case_for("permute_y+mul", "bfloat16", tokens=9)
    report = parity.assert_agrees(parity.run(case, ["triton_gg", "pallas_gg"], **DEV))
    assert report.reference == "torch" and report.agreements


def test_cli_sweep_in_device_mode(tmp_path):
    out = run_cli("--sweep", "--presets", "tiny,tiny_odd", "--tokens", "8", "--device", "cpu",
                  "--reference", "torch", "--backends", "numpy,torch,torch_grouped_mm",
                  "--json", str(tmp_path / "d.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["passed"] and data["reference"] == "torch" and len(data["reports"]) == 12
    assert all(r["reference"] == "torch" for r in data["reports"])
    assert sum(line.startswith("PASS ") for line in out.stdout.splitlines()) == 12 * 4
    assert "float64 reference on cpu" in out.stdout


# ---------------------------------------------------------------- GPU (-m gpu; unverified on CPU)

@pytest.mark.gpu
def test_gpu_jax_inputs_alias_torch_buffers_through_dlpack():
    jax = pytest.importorskip("jax")
    if jax.default_backend() not in ("gpu", "cuda"):
        pytest.skip(f"JAX runs on {jax.default_backend()}, not the GPU")
    inputs = parity.Inputs(Case.from_preset("tiny", "first", 16, dtype="bfloat16"), "cuda")
    for key in ("x", "w", "m_sizes"):
        t, a = inputs.torch(key), inputs.jax(key)
        assert a.unsafe_buffer_pointer() == t.data_ptr(), f"{key} was copied"


@pytest.mark.gpu
def test_gpu_device_inputs_alias_into_jax_and_reference_matches_host():
    """Device mode on the GPU: JAX reads the torch buffers, and the float64 reference on the
    GPU equals gg_spec's on host copies (the numpy backend) on a mid-size shape."""
    jax = pytest.importorskip("jax")
    case = Case.explicit(8, 384, 256, 2, 64, fusion="permute_y+mul", dtype="bfloat16")
    inputs = parity.DeviceInputs(case, "cuda")
    if jax.default_backend() in ("gpu", "cuda"):
        for key in ("x", "w", "m_sizes"):
            assert inputs.jax(key).unsafe_buffer_pointer() == inputs.torch(key).data_ptr()
    report = parity.assert_agrees(parity.run(case, ["numpy", "torch"], device="cuda"))
    assert report.reference == "torch"
    assert all(r.rel_error < 1e-12 for r in report.rows if r.backend == "numpy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_gpu_real_shape_every_backend(fusion, dtype):
    """triton_gg and pallas_gg agree with each other and the references on the GPU, in bf16
    and in float32 (IEEE fp32 dots on both sides)."""
    second = "permute_y" in fusion or "mul" in fusion
    case = Case.from_preset("qwen3_30b_a3b", "second" if second else "first", 128,
                            dtype=dtype, fusion=fusion)
    backends = ["torch", "triton_gg", "pallas_gg", "torch_grouped_mm", "lax_ragged_dot"]
    report = parity.assert_agrees(parity.run(case, backends, device="cuda"))
    assert report.device == "cuda" and report.agreements


def test_compare_matches_gg_spec_error_definitions():
    from gg_spec import max_abs_error, rel_error
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((7, 5))
    for out in (ref + 1e-3 * rng.standard_normal(ref.shape), ref.copy(), np.zeros_like(ref)):
        rel, mx, ok, _ = parity.compare(out, ref, 1e-2)
        assert math.isclose(rel, rel_error(out, ref), rel_tol=1e-12, abs_tol=1e-300)
        assert math.isclose(mx, max_abs_error(out, ref), rel_tol=1e-12, abs_tol=1e-300)
    bad = ref.copy()
    bad[2, 3] = np.nan
    assert parity.compare(bad, ref, 1.0)[2] is False
    assert parity.compare(np.zeros((0, 3)), np.zeros((0, 3)), 1e-4) == (0.0, 0.0, True, "")
    assert parity.compare(np.ones((2, 2)), np.zeros((2, 2)), 1e-4)[0] == math.inf
    assert parity.compare(np.zeros((2, 2)), np.zeros((2, 2)), 1e-4)[:3] == (0.0, 0.0, True)
    assert "shape" in parity.compare(np.zeros((2, 3)), np.zeros((3, 2)), 1.0)[3]


def test_both_backends_use_one_tuning_key():
    """triton_gg and pallas_gg cache a tuned config under the same key for one problem."""
    pytest.importorskip("triton_gg")
    pytest.importorskip("pallas_gg")
    import torch
    from pallas_gg import tuning
    from triton_gg import autotune

    import gg_spec
    dims = gg_spec.Dims(num_experts=8, n=96, k=64, m=300, tokens=150, routed_rows=300)
    ours = autotune.key_for("dX", dims, torch.bfloat16, torch.device("cpu"), permute_y=True)
    theirs = tuning._key("dX", num_experts=8, n=96, k=64, rows=300, dtype="bfloat16",
                         permute_x=False, permute_y=True, fuse_mul_post=False)
    assert ours == theirs


# ---------------------------------------------------------------- the whole expert block

@pytest.mark.parametrize("preset,dtype,extras", [
    ("tiny", "float32", {}), ("tiny_odd", "float32", {"biases": True, "foreign_ids": True}),
    ("tiny", "bfloat16", {"foreign_ids": True})])
def test_moe_block_torch_and_jax_agree(preset, dtype, extras):
    from parity.block import BlockCase, run_block
    report = run_block(BlockCase(preset, tokens=12, dtype=dtype, **extras))
    assert report.passed, report.table()
    compared = {who for who, *_ in report.rows}
    assert compared == {"triton_gg vs float64", "pallas_gg vs float64",
                        "triton_gg vs pallas_gg"}
    outputs = {name for _, name, *_ in report.rows}
    assert {"out", "d_hidden", "d_gate_up_proj", "d_down_proj", "d_top_k_weights"} <= outputs


def test_moe_block_report_fails_on_a_wrong_backend(monkeypatch):
    """The block comparison can fail: a backend whose routing-weight gradient is off by 1%."""
    from parity import block
    real = block.RUNNERS["pallas_gg"]

    def off(inputs, case):
        out = real(inputs, case)
        out["d_top_k_weights"] = out["d_top_k_weights"] * 1.01
        return out
    monkeypatch.setitem(block.RUNNERS, "pallas_gg", off)
    report = block.run_block(block.BlockCase("tiny", tokens=8))
    assert not report.passed
    failing = {(who, name) for who, name, _, ok in report.rows if not ok}
    assert failing == {("pallas_gg vs float64", "d_top_k_weights"),
                       ("triton_gg vs pallas_gg", "d_top_k_weights")}


def test_cli_moe_block(capsys):
    from parity.cli import main
    assert main(["--moe-block", "--tokens", "6"]) == 0
    assert "PASS: 2/2 expert-block cases" in capsys.readouterr().out
