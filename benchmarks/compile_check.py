"""Compile triton_gg's forward, dX and dW kernels for sm_90 on a machine without a GPU (no device
time): catches compiler failures and reports shared memory per program, the wgmma count and
the number of loops left in the TTGIR (for the persistent forward and dW, 1 means their tile
and reduction loops were flattened into one) and the asynchronous (software-pipelined) loads in
it, for the tiles of the tuned entries.

    TRITON_INTERPRET=0 python -m benchmarks.compile_check
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")


# the compile helpers live in triton_gg (tests/test_compile_sm90.py uses them too)
from triton_gg.kernels.compile_sm90 import compile_dw, compile_dx, compile_forward  # noqa: E402


def _survey(compile_fn, tiles, fusions):
    failed = 0
    for *tile, extra in tiles:
        for fusion in fusions:
            name = (f"{compile_fn.__name__} {'x'.join(map(str, tile[:3]))} w{tile[3]} "
                    f"s{tile[4]} {extra or ''} {fusion or 'plain'}")
            try:
                c = compile_fn(*tile, **extra, **fusion)
                ttgir = c.asm["ttgir"]
                print(f"{name}: shared {c.metadata.shared} B, wgmma "
                      f"{c.asm['ptx'].count('wgmma.mma_async')}, loops "
                      f"{ttgir.count('scf.for')}, async loads "
                      f"{ttgir.count('async_copy_global_to_local')} cp.async + "
                      f"{ttgir.count('async_tma_copy_global_to_local')} TMA", flush=True)
            except Exception as exc:  # report and go on: this is a survey
                failed += 1
                print(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return failed


def main() -> int:
    failed = _survey(compile_forward,
                     [(128, 256, 64, 8, 3, {}), (128, 256, 64, 8, 3, {"warp_specialize": True}),
                      (128, 128, 64, 4, 3, {})],
                     [{}, {"permute_x": True}, {"permute_y": True, "fuse_mul": True}])
    failed += _survey(compile_dx, [(128, 64, 256, 8, 3, {}), (128, 64, 128, 8, 3, {})],
                      [{}, {"permute_x": True}, {"permute_y": True}])
    failed += _survey(compile_dw, [(64, 128, 256, 8, 3, {}), (64, 128, 128, 4, 3, {}),
                                   (64, 128, 128, 4, 3, {"tma_loads": False})],
                      [{}, {"permute_x": True}])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
