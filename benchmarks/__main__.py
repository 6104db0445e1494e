"""python -m benchmarks: time every implementation on the anchor shapes, in one process on
one card; write results JSON, a markdown table and a PNG plot.

Example: python -m benchmarks --tokens 8192 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ALL_IMPLS = ["dense", "torch_grouped_mm", "triton_gg", "dense_xla", "lax_ragged_dot",
             "tokamax", "pallas_gg"]
# triton_gg and pallas_gg run with the library's defaults (what a user gets). Also accepted
# by --impls (not in the default set), each labelled as not the default:
# triton_gg_autotune (autotune=True), triton_gg_value_checks (the opt-in value checks on),
# pallas_gg_tuned (configs from pallas_gg.tune),
# pallas_gg_mosaic (backend="mosaic")


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--shapes", default="qwen3_w1,qwen3_w2,llama4_w1,gptoss_w1",
                   help="anchor names (qwen3_w1) or <preset>_w1/_w2, comma separated")
    p.add_argument("--tokens", default="8192", help="comma separated token counts")
    p.add_argument("--sweep", action="store_true", help="tokens 512,2048,8192,32768")
    p.add_argument("--impls", default=",".join(ALL_IMPLS))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--configs-from", type=int, default=None, metavar="TOKENS",
                   help="run every token count on the configs tuned at TOKENS (copied to "
                        "the other row buckets of the tuning cache where they have none): "
                        "a sweep without tuning each bucket (each key compiles every "
                        "candidate)")
    p.add_argument("--repeat", default="", metavar="IMPL",
                   help="time IMPL's forward again at the end of each shape (impl "
                        "'<IMPL>_again'): checks that the order of measurement does not matter")
    return p.parse_args(argv)


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for mod in ("torch", "triton", "jax", "jaxlib"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({e.__class__.__name__})"
    return out


def _row(shape, tokens, impl, op, ms, flops, error=None):
    mult = 2 if op == "bwd" else 1
    row = {"shape": shape, "tokens": tokens, "impl": impl, "op": op, "ms": ms,
           "tflops": (mult * flops / (ms * 1e-3) / 1e12) if ms else 0.0}
    if error:
        row["error"] = error
    return row


def run(args) -> list[dict]:
    import torch

    import gg_spec
    from benchmarks import jax_impls, problems, timing, torch_impls
    impls = set(args.impls.split(","))
    tokens_list = ([512, 2048, 8192, 32768] if args.sweep
                   else [int(t) for t in args.tokens.split(",")])
    rows = []
    for shape_name in args.shapes.split(","):
        for tokens in tokens_list:
            prob = problems.make_problem(shape_name, tokens)
            print(f"== {shape_name} T={tokens} M={prob.m} E={prob.shape.num_experts} "
                  f"N={prob.shape.n} K={prob.shape.k}", flush=True)
            if args.configs_from:
                _borrow_configs(prob, args.configs_from)
            inp = torch_impls.TorchInputs(prob)
            benches = list(torch_impls.all_torch(prob, inp, impls))
            again = [b for b in benches if b[0] == args.repeat and b[1] == "fwd"][:1]
            benches += [(f"{impl}_again", op, fn) for impl, op, fn in again]
            # every torch implementation of a shape timed in the same rounds (the clock
            # falls under sustained load; see timing.time_torch_interleaved)
            times = timing.time_torch_interleaved({(impl, op): fn for impl, op, fn in benches})
            for impl, op, _ in benches:
                ms = times[(impl, op)]
                if isinstance(ms, Exception):
                    traceback.print_exception(ms)
                    rows.append(_row(shape_name, tokens, impl, op, 0.0, prob.flops, repr(ms)))
                else:
                    rows.append(_row(shape_name, tokens, impl, op, ms, prob.flops))
                print(f"   {impl:22s} {op:4s} {rows[-1]['ms']:8.3f} ms "
                      f"{rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
            del benches
            jax_wanted = impls & {"dense_xla", "lax_ragged_dot", "tokamax", "pallas_gg",
                                  "pallas_gg_tuned", "pallas_gg_mosaic"}
            if jax_wanted:
                jbenches = []
                try:
                    for impl, make in jax_impls.jax_groups(inp, prob.shape.is_first_gemm,
                                                           impls):
                        try:
                            jbenches += make()
                        except Exception as e:  # noqa: BLE001
                            traceback.print_exc()
                            rows.append(_row(shape_name, tokens, impl, "setup", 0.0,
                                             prob.flops, repr(e)[:500]))
                except Exception as e:  # noqa: BLE001  (the inputs' conversion)
                    traceback.print_exc()
                    rows.append(_row(shape_name, tokens, "jax", "setup", 0.0, prob.flops,
                                     repr(e)[:500]))
                for impl, op, fn, fargs in jbenches:
                    try:
                        ms = timing.time_jax(fn, *fargs)
                        rows.append(_row(shape_name, tokens, impl, op, ms, prob.flops))
                    except Exception as e:  # noqa: BLE001
                        traceback.print_exc()
                        rows.append(_row(shape_name, tokens, impl, op, 0.0, prob.flops,
                                         repr(e)[:500]))
                    print(f"   {impl:22s} {op:4s} {rows[-1]['ms']:8.3f} ms "
                          f"{rows[-1]['tflops']:7.1f} TFLOP/s", flush=True)
                del jbenches
            del inp
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def _borrow_configs(prob, from_tokens: int) -> None:
    """The configs tuned at from_tokens, for this problem's row bucket (both backends)."""
    from gg_spec import tuning_cache
    s = prob.shape
    for backend in ("triton", "pallas"):
        written = tuning_cache.borrow_bucket(backend, num_experts=s.num_experts, n=s.n, k=s.k,
                                             from_rows=from_tokens * s.topk, to_rows=prob.m)
        if written:
            print(f"   {backend}: {len(written)} configs from T={from_tokens}", flush=True)


def _without_out_dir(argv: list[str]) -> str:
    """The command line as recorded in results: without the (machine-specific) --out path."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return " ".join(out)


def main(argv=None) -> int:
    args = _args(argv)
    import torch
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA GPU", file=sys.stderr)
        return 2
    from benchmarks import report
    card = torch.cuda.get_device_name().replace(" ", "_")
    date = datetime.date.today().isoformat()
    rows = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-{card}{('-' + args.tag) if args.tag else ''}"
    report.write_json(out / f"{stem}.json", card, date, _versions(), rows)
    tokens = sorted({r["tokens"] for r in rows})
    md = []
    shown = _without_out_dir(argv if argv is not None else sys.argv[1:])
    for t in tokens:
        md.append(f"### T = {t} ({card}, {date}, `python -m benchmarks {shown}`)\n")
        md.append(report.markdown(rows, t))
        md.append("")
        report.plot(out / f"{stem}-T{t}.png", rows, t, f"{card} bf16 T={t}")
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    big = max(tokens)
    for label, num, den, op, op_den in [
            ("triton fwd / torch_grouped_mm fwd", "triton_gg", "torch_grouped_mm", "fwd", None),
            ("triton bwd / torch_grouped_mm bwd", "triton_gg", "torch_grouped_mm", "bwd", None),
            ("grouped_mm fwd / torch_grouped_mm", "triton_gg_grouped_mm", "torch_grouped_mm",
             "fwd", None),
            ("grouped_mm bwd / torch_grouped_mm", "triton_gg_grouped_mm", "torch_grouped_mm",
             "bwd", None),
            ("pallas fwd / triton fwd", "pallas_gg", "triton_gg", "fwd", None),
            ("pallas bwd / triton bwd", "pallas_gg", "triton_gg", "bwd", None),
            ("triton fwd / dense", "triton_gg", "dense", "fwd", "fwd"),
            ("triton dW / dense", "triton_gg", "dense", "dW", "fwd"),
            ("pallas fwd / dense_xla", "pallas_gg", "dense_xla", "fwd", "fwd")]:
        r = report.ratios(rows, num, den, op, op_den, tokens=big)
        print(f"{label:36s} " + "  ".join(f"{s}={v:.2f}" for s, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
