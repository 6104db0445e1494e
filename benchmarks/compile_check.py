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


def _compile(kernel, sig, consts, num_warps, num_stages):
    """triton.compile of a @triton.jit kernel for sm_90: `sig` types the runtime arguments,
    `consts` gives every constexpr (arguments absent from the kernel are ignored)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    consts = {a: v for a, v in consts.items() if a in names}
    signature = {a: ("constexpr" if a in consts else sig[a]) for a in names}
    # a launch specializes 16-byte-aligned pointers (torch's allocations are) with this
    # hint; without it the loads cannot be vectorized and are not pipelined
    aligned = {(names.index(a),): [["tt.divisibility", 16]] for a in names
               if a not in consts and sig[a].startswith("*")}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(a),): v for a, v in consts.items()}, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _desc(rows, cols):
    return f"tensordesc<bf16[{rows}, {cols}]>"


def compile_forward(block_m, block_n, block_k, num_warps, num_stages, *,
                    permute_x=False, permute_y=False, fuse_mul=False, tma_x=True,
                    warp_specialize=False, n=1536, k=2048):
    from triton_gg.kernels.forward import _forward_kernel
    tma_x = tma_x and not permute_x
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "x_desc": _desc(block_m, block_k),
           "w_desc": _desc(block_n, block_k),
           "y_ptr": "*bf16", "y_unweighted_ptr": "*bf16", "m_sizes_ptr": "*i32",
           "gather_ptr": "*i32", "topk_weights_ptr": "*fp32", "E": "i32", "M": "i32",
           "TOPK": "i32", "num_programs": "i32", "stride_we": "i64", "stride_wn": "i64",
           "stride_wk": "i64"}
    consts = dict(N=n, K=k, PERMUTE_X=permute_x, PERMUTE_Y=permute_y, FUSE_MUL=fuse_mul,
                  STORE_UNWEIGHTED=False, TMA_W=True, TMA_X=tma_x, BLOCK_M=block_m,
                  BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, E_POW2=128, EVEN_K=True,
                  WARP_SPECIALIZE=warp_specialize, UPCAST_DOT=False, IEEE_DOT=False)
    if not tma_x:
        consts["x_desc"] = None
    return _compile(_forward_kernel, sig, consts, num_warps, num_stages)


def compile_dx(block_m, block_n, block_k, num_warps, num_stages, *,
               permute_x=False, permute_y=False, tma_dy=True, n=1536, k=2048):
    from triton_gg.kernels.dx import _dx_kernel
    tma_dy = tma_dy and not permute_y
    sig = {"dy_ptr": "*bf16", "w_ptr": "*bf16", "dy_desc": _desc(block_m, block_n),
           "w_desc": _desc(block_n, block_k),
           "dx_ptr": "*bf16", "m_sizes_ptr": "*i32", "gather_ptr": "*i32", "E": "i32",
           "M": "i32", "num_m_tiles": "i32", "stride_we": "i64", "stride_wn": "i64",
           "stride_wk": "i64"}
    consts = dict(N=n, K=k, PERMUTE_X=permute_x, PERMUTE_Y=permute_y, TMA_W=True,
                  TMA_DY=tma_dy, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                  GROUP_M=1, E_POW2=128, EVEN_N=True, UPCAST_DOT=False, IEEE_DOT=False)
    if not tma_dy:
        consts["dy_desc"] = None
    return _compile(_dx_kernel, sig, consts, num_warps, num_stages)


def compile_dw(block_m, block_n, block_k, num_warps, num_stages, *, tma_loads=True,
               tma_store=True, permute_x=False, permute_y=False, n=1536, k=2048):
    from triton_gg.kernels.dw import _dw_kernel
    sig = {"x_ptr": "*bf16", "dy_ptr": "*bf16", "dw_ptr": "*bf16",
           "dw_desc": f"tensordesc<bf16[1, {block_n}, {block_k}]>", "m_sizes_ptr": "*i32",
           "gather_ptr": "*i32", "E": "i32", "M": "i32", "TOPK": "i32",
           "num_programs": "i32", "stride_de": "i64", "stride_dn": "i64", "stride_dk": "i64"}
    consts = dict(N=n, K=k, PERMUTE_X=permute_x, PERMUTE_Y=permute_y,
                  TMA_X=tma_loads and not permute_x, TMA_DY=tma_loads and not permute_y,
                  TMA_DW=tma_store, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                  E_POW2=128, UPCAST_DOT=False, IEEE_DOT=False)
    if not tma_store:
        consts["dw_desc"] = None
    return _compile(_dw_kernel, sig, consts, num_warps, num_stages)


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
