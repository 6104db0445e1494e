"""``python -m parity``: run cases through the backends and print what agrees.

    python -m parity                                  # tiny preset, T=16, fp32, both GEMMs
                                                      # with their fusions, every backend
    python -m parity --preset qwen3_30b_a3b --gemm first --tokens 64 --dtype bfloat16
    python -m parity --shape 8,96,40 --topk 2 --all-fusions --backends numpy,torch,triton_gg
    python -m parity --sweep                          # every preset x fusion x op, one line each
    python -m parity --sweep --presets tiny_odd,qwen3_30b_a3b --tokens 8
    python -m parity --plugin my_backends.py --backends numpy,my_backend
    python -m parity --moe-block                      # the expert block, torch vs JAX

Exit status: 0 when every case passed, 1 when any output is out of tolerance, a backend
raised, triton_gg and pallas_gg disagree, or a backend named in ``--backends`` is unavailable
(a backend of the default list that is unavailable is shown but does not fail the run, so the
default command passes where a framework is missing); 2 on bad arguments. A backend that does
not apply to a case (an external reference on a fused case) is "skipped" and never fails.

``--sweep`` runs the tiny presets on CPU (the real ones at any token count are too slow for
the Triton and Pallas interpreters) and the real presets when torch sees a GPU; ``--presets``
overrides either choice. Presets whose weights are too large (``--max-weight-elems``: the
float64 dW reference of deepseek_v3 alone would be 60 GB) are skipped with a note.

``--reference`` picks where the float64 truth comes from. numpy: inputs drawn in numpy and
gg_spec's reference on the host (the ground truth; the default on CPU). torch: inputs drawn on
the torch device (cached per shape, shared by its fusions and ops), the float64 reference and
every comparison computed there, only scalars brought back (``parity.device``; the default when
the device is cuda, where the host reference takes minutes per real-model case).
``--device cpu --reference torch`` runs that device code path on CPU tensors. The committed GPU
sweep:

    python -m parity --sweep --dtype bfloat16 --json sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from gg_spec.cases import FUSIONS
from gg_spec.presets import PRESETS, REAL_PRESETS, TINY_PRESETS, get_preset
from gg_spec.routing import ROUTING_KINDS
from gg_spec.tolerances import TOLERANCES
from parity.backends import (DEFAULT_BACKENDS, Unavailable, backend_names, get_backend,
                             load_plugin)
from parity.case import OPS, Case, fusion_by_name, make_cases
from parity.device import clear_cache
from parity.harness import reference_mode, run
from parity.inputs import resolve_device

# Host mode: make_inputs draws W in float64 and the reference converts it again, ~20 bytes
# of host memory per weight element. Device mode: the float64 dW reference (8 bytes per
# element), W and the backends' dW outputs, ~25 bytes of GPU memory per element at the peak.
# 2.5e9 elements keeps every preset but deepseek_v3 (7.5e9) either way.
MAX_WEIGHT_ELEMS = 2_500_000_000


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--preset", "--presets", dest="presets", type=_csv, default=None,
                      help=f"preset name(s), comma-separated (default tiny; sweep: "
                           f"tiny presets on CPU, real ones on a GPU). Known: {', '.join(PRESETS)}")
    what.add_argument("--gemm", choices=("first", "second", "both"), default="both",
                      help="which GEMM of the MoE MLP (first: gate_up, second: down)")
    what.add_argument("--shape", type=lambda s: tuple(int(v) for v in _csv(s)), default=None,
                      metavar="E,N,K", help="an explicit W [E, N, K] instead of a preset "
                                            "(default fusions: all five)")
    what.add_argument("--tokens", type=int, default=None,
                      help="tokens T (default 16; sweep on a GPU: 128)")
    what.add_argument("--topk", type=int, default=None,
                      help="override the preset's top-k (with --shape: default 2)")
    what.add_argument("--dtype", choices=list(TOLERANCES), default="float32")
    what.add_argument("--routing", choices=ROUTING_KINDS, default="random")
    what.add_argument("--fusions", type=_csv, default=None,
                      help=f"comma list of {', '.join(FUSIONS)} (default: each GEMM's own: "
                           f"first plain,permute_x; second plain,permute_y,mul,permute_y+mul)")
    what.add_argument("--all-fusions", action="store_true", help="all five fusions on every GEMM")
    what.add_argument("--ops", type=_csv, default=list(OPS), help=f"comma list of {', '.join(OPS)}")
    what.add_argument("--seed", type=int, default=0)
    what.add_argument("--sweep", action="store_true",
                      help="every preset x GEMM x fusion x op, one summary line each")
    what.add_argument("--moe-block", action="store_true",
                      help="the whole expert block (triton_gg.moe_experts and "
                           "pallas_gg.moe_experts, outputs and gradients) on the presets, "
                           "plain and with biases and foreign expert ids, against a float64 "
                           "loop on the CPU (parity.block; --backends narrows the two)")
    what.add_argument("--max-weight-elems", type=float, default=MAX_WEIGHT_ELEMS,
                      help="skip shapes whose W has more elements (host reference memory)")
    how = p.add_argument_group("how")
    how.add_argument("--backends", type=_csv, default=None,
                     help="comma list (default: every default backend; 'all': every "
                          "registered one). Named backends must be available.")
    how.add_argument("--pairs", default=None,
                     help="backend pairs that must agree, a~b comma-separated, or 'none' "
                          "(default: triton_gg~pallas_gg, and triton_gg with any other "
                          "pallas_gg:<lowering> in --backends)")
    how.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    how.add_argument("--reference", choices=("auto", "numpy", "torch"), default=None,
                     help="float64 reference: numpy (inputs and gg_spec's reference on the "
                          "host), torch (inputs, reference and comparisons on the torch "
                          "device) or auto (default, or $PARITY_REFERENCE: torch when the "
                          "device is cuda, numpy otherwise)")
    how.add_argument("--plugin", action="append", default=[],
                     help="import a module or .py file that registers backends (repeatable)")
    how.add_argument("--list-backends", action="store_true",
                     help="list the registered backends and whether they are available")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every report as JSON")
    out.add_argument("-q", "--quiet", action="store_true", help="summary lines only")
    out.add_argument("-v", "--verbose", action="store_true", help="print backend tracebacks")
    return p


def _pairs(text: str | None):
    if text is None:
        return None          # the harness default: triton_gg vs each pallas_gg variant
    if text == "none":
        return ()
    pairs = []
    for item in _csv(text):
        a, sep, b = item.partition("~")
        if not sep or not a or not b:
            raise ValueError(f"--pairs wants a~b items, got {item!r}")
        pairs.append((a, b))
    return tuple(pairs)


def _backend_status(name: str) -> str:
    b = get_backend(name)
    try:
        b.check_available()
    except Unavailable as e:
        return f"unavailable: {e}"
    return "available"


def _cases(args, device: str) -> tuple[list[Case], list[str]]:
    """The cases to run and notes about what was left out."""
    ops = tuple(args.ops)
    fusions = "all" if args.all_fusions else args.fusions
    for name in fusions if isinstance(fusions, list) else ():
        fusion_by_name(name)                      # a typo is a usage error, not a skip
    bad_ops = [o for o in ops if o not in OPS]
    if bad_ops or not ops:
        raise ValueError(f"--ops must name some of {', '.join(OPS)}, got {args.ops}")
    if args.shape is not None:
        if len(args.shape) != 3:
            raise ValueError(f"--shape wants E,N,K, got {args.shape}")
        e, n, k = args.shape
        names = fusions if isinstance(fusions, list) else list(FUSIONS)
        tokens = 16 if args.tokens is None else args.tokens
        return [Case.explicit(e, n, k, args.topk or 2, tokens, dtype=args.dtype,
                              routing=args.routing, fusion=f, seed=args.seed, ops=ops)
                for f in names], []
    if args.presets is not None:
        presets = args.presets
    elif args.sweep:
        presets = list(REAL_PRESETS if device == "cuda" else TINY_PRESETS)
    else:
        presets = ["tiny"]
    tokens = args.tokens if args.tokens is not None else (128 if args.sweep and device == "cuda"
                                                          else 16)
    cases, notes = [], []
    for name in presets:
        preset = get_preset(name)
        big = max(preset.first, preset.second, key=lambda s: s.num_experts * s.n * s.k)
        elems = big.num_experts * big.n * big.k
        if elems > args.max_weight_elems:
            notes.append(f"skipped preset {name}: W has {elems:.2e} elements "
                         f"(> --max-weight-elems {args.max_weight_elems:.2e})")
            continue
        try:
            cases += make_cases([name], args.gemm, tokens, topk=args.topk, dtype=args.dtype,
                                routing=args.routing, fusions=fusions, ops=ops, seed=args.seed)
        except ValueError as e:
            if not args.sweep:
                raise
            # e.g. a --topk override larger than this preset's expert count
            notes.append(f"skipped preset {name}: {e}")
    return cases, notes


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        for plugin in args.plugin:
            load_plugin(plugin)
        if args.list_backends:
            for name in backend_names():
                default = " (default)" if name in DEFAULT_BACKENDS else ""
                print(f"{name:<18} {get_backend(name).description}{default}: "
                      f"{_backend_status(name)}")
            return 0
        backends = None
        if args.backends is not None:
            backends = backend_names() if args.backends == ["all"] else args.backends
            for b in backends:
                get_backend(b)     # unknown names are usage errors, before any work
        pairs = _pairs(args.pairs)
        device = resolve_device(args.device)
        if args.moe_block:
            return _run_blocks(args, device)
        reference = reference_mode(args.reference, device, backends)
        cases, notes = _cases(args, device)
    except ValueError as e:
        parser.error(str(e))
    try:
        return _run_cases(args, cases, notes, backends, pairs, device, reference)
    finally:
        clear_cache()


def _run_cases(args, cases, notes, backends, pairs, device, reference="numpy") -> int:
    t0 = time.perf_counter()
    shown = backends if backends is not None else list(DEFAULT_BACKENDS)
    where = "host (numpy)" if reference == "numpy" else device
    print(f"parity: {len(cases)} case(s), ops {','.join(args.ops)}, device {device}, "
          f"float64 reference on {where}; backends:")
    for name in shown:
        requested = "" if backends is None else " (requested)"
        print(f"  {name:<18} {_backend_status(name)}{requested}")
    for note in notes:
        print(f"  note: {note}")
    reports = []
    for case in cases:
        report = run(case, backends, pairs=pairs, device=device, reference=reference)
        reports.append(report)
        if args.sweep or args.quiet:
            for line in report.summary_lines():
                print(line, flush=True)
        else:
            print(report.table(), flush=True)
        if args.verbose:
            for r in report.runs:
                if r.traceback:
                    print(f"--- {r.backend} {r.op}\n{r.traceback}")
    failed = [r for r in reports if not r.passed]
    if failed and (args.sweep or args.quiet):
        print("\nfailing cases:")
        for r in failed:
            print(r.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "device": device, "reference": reference,
                       "passed": not failed,
                       "notes": notes, "reports": [r.to_dict() for r in reports]}, f, indent=1)
    seconds = time.perf_counter() - t0
    print("\n" + _time_line(reports, device))
    verdict = "PASS" if reports and not failed else "FAIL"
    print(f"\n{verdict}: {len(reports) - len(failed)}/{len(reports)} cases passed "
          f"in {seconds:.1f} s")
    for r in failed:
        for line in r.failures():
            print(f"  {r.case.id}: {line}")
    return 1 if failed or not reports else 0


def _run_blocks(args, device: str) -> int:
    """--moe-block: each preset's expert block, plain and with biases + foreign ids."""
    from parity.block import BlockCase, run_block
    t0 = time.perf_counter()
    presets = args.presets or ["tiny"]
    tokens = 16 if args.tokens is None else args.tokens
    reports = []
    for name in presets:
        for extras in (dict(), dict(biases=True, foreign_ids=True)):
            case = BlockCase(name, tokens, args.dtype, args.seed, device=device, **extras)
            chosen = [b for b in ("triton_gg", "pallas_gg")
                      if args.backends is None or b in args.backends]
            report = run_block(case, chosen)
            reports.append(report)
            print(report.table(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "device": device,
                       "reports": [r.to_json() for r in reports]}, f, indent=1)
    failed = [r for r in reports if not r.passed]
    print(f"\n{'FAIL' if failed else 'PASS'}: {len(reports) - len(failed)}/{len(reports)} "
          f"expert-block cases passed in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


def _time_line(reports, device: str) -> str:
    """Where the time went: each backend's calls, and the harness itself (drawing inputs, the
    float64 reference, comparisons, first imports); on a GPU also torch's peak memory."""
    per_backend: dict[str, float] = {}
    for r in reports:
        for run_ in r.runs:
            per_backend[run_.backend] = per_backend.get(run_.backend, 0.0) + run_.seconds
    harness = sum(r.seconds for r in reports) - sum(per_backend.values())
    cells = [f"{name} {sec:.1f} s" for name, sec in per_backend.items()]
    line = "time: " + ", ".join(cells + [f"harness (imports, inputs, reference, compare) {harness:.1f} s"])
    if device == "cuda" and "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            line += f"; peak torch GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return line


__all__ = ["build_parser", "main"]
