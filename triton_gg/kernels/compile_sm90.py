"""Compile triton_gg's GEMM kernels for sm_90 (Hopper) without a GPU.

``triton.compile`` runs Triton's whole pipeline down to a cubin on a CPU machine when ptxas
is present (triton ships one), so compiler failures and the shared memory each program needs
(``compiled.metadata.shared``, in bytes) can be checked without device time. The constexprs
mirror what the launchers (``launch_forward``, ``launch_dx``, ``launch_dw``) pass on a
Hopper GPU for the same config, fusions and dtype, with TMA usable wherever a switch asks for
it. Used by ``benchmarks/compile_check.py`` and ``tests/test_compile_sm90.py``.
"""

from __future__ import annotations

import os

# the dtype names of the public API -> Triton's type names
TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _compile(kernel, sig, consts, num_warps, num_stages):
    """triton.compile of a @triton.jit kernel for sm_90: `sig` types the runtime arguments,
    `consts` gives every constexpr (arguments absent from the kernel are ignored)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    # (sig may name arguments a kernel version lacks: e.g. the row count M; an argument
    # missing from sig is taken for an int32 scalar)
    consts = {a: v for a, v in consts.items() if a in names}
    sig = {a: sig.get(a, "i32") for a in names if a not in consts}
    signature = {a: ("constexpr" if a in consts else sig[a]) for a in names}
    # a launch specializes 16-byte-aligned pointers (torch's allocations are) with this
    # hint; without it the loads cannot be vectorized and are not pipelined
    aligned = {(names.index(a),): [["tt.divisibility", 16]] for a in names
               if a not in consts and sig[a].startswith("*")}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(a),): v for a, v in consts.items()}, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def can_compile() -> tuple[bool, str]:
    """(True, "") when this machine can compile for sm_90, else (False, why)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False, "TRITON_INTERPRET is on (set TRITON_INTERPRET=0 before importing triton)"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(90).path
        if not path or not os.path.exists(path):
            return False, "no ptxas"
    except Exception as exc:  # no nvidia backend, no ptxas
        return False, f"no sm_90 toolchain ({type(exc).__name__}: {exc})"
    return True, ""


def _desc(ty, *block):
    return f"tensordesc<{ty}[{', '.join(map(str, block))}]>"


def compile_forward(block_m, block_n, block_k, num_warps, num_stages, *,
                    permute_x=False, permute_y=False, fuse_mul=False, tma_x=True, tma_w=True,
                    store_unweighted=False, warp_specialize=False, group_m=8,
                    dtype="bfloat16", n=1536, k=2048):
    from triton_gg.kernels.forward import _forward_kernel
    ty = TRITON_TYPES[dtype]
    tma_x = tma_x and not permute_x
    sig = {"x_ptr": f"*{ty}", "w_ptr": f"*{ty}", "x_desc": _desc(ty, block_m, block_k),
           "w_desc": _desc(ty, block_n, block_k),
           "y_ptr": f"*{ty}", "y_unweighted_ptr": f"*{ty}", "m_sizes_ptr": "*i32",
           "gather_ptr": "*i32", "topk_weights_ptr": "*fp32", "E": "i32", "M": "i32", "TOPK": "i32",
           "num_programs": "i32", "stride_we": "i64", "stride_wn": "i64", "stride_wk": "i64"}
    consts = dict(N=n, K=k, PERMUTE_X=permute_x, PERMUTE_Y=permute_y, FUSE_MUL=fuse_mul,
                  STORE_UNWEIGHTED=store_unweighted and fuse_mul, TMA_W=tma_w, TMA_X=tma_x,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                  E_POW2=128, EVEN_K=k % block_k == 0, WARP_SPECIALIZE=warp_specialize,
                  UPCAST_DOT=False, IEEE_DOT=dtype == "float32")
    if not tma_x:
        consts["x_desc"] = None
    if not tma_w:
        consts["w_desc"] = None
    return _compile(_forward_kernel, sig, consts, num_warps, num_stages)


def compile_dx(block_m, block_n, block_k, num_warps, num_stages, *,
               permute_x=False, permute_y=False, tma_dy=True, tma_w=True, group_m=1,
               dtype="bfloat16", n=1536, k=2048):
    from triton_gg.kernels.dx import _dx_kernel
    ty = TRITON_TYPES[dtype]
    tma_dy = tma_dy and not permute_y
    sig = {"dy_ptr": f"*{ty}", "w_ptr": f"*{ty}", "dy_desc": _desc(ty, block_m, block_n),
           "w_desc": _desc(ty, block_n, block_k),
           "dx_ptr": f"*{ty}", "m_sizes_ptr": "*i32", "gather_ptr": "*i32", "E": "i32", "M": "i32",
           "num_m_tiles": "i32", "stride_we": "i64", "stride_wn": "i64", "stride_wk": "i64"}
    consts = dict(N=n, K=k, PERMUTE_X=permute_x, PERMUTE_Y=permute_y, TMA_W=tma_w,
                  TMA_DY=tma_dy, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                  GROUP_M=group_m, E_POW2=128, EVEN_N=n % block_n == 0, UPCAST_DOT=False,
                  IEEE_DOT=dtype == "float32")
    if not tma_dy:
        consts["dy_desc"] = None
    if not tma_w:
        consts["w_desc"] = None
    return _compile(_dx_kernel, sig, consts, num_warps, num_stages)


def compile_dw(block_m, block_n, block_k, num_warps, num_stages, *, tma_loads=True,
               tma_x=None, tma_dy=None, tma_store=True, permute_x=False, permute_y=False,
               dtype="bfloat16", n=1536, k=2048):
    """``tma_loads`` sets both operand switches; ``tma_x`` / ``tma_dy`` override it."""
    from triton_gg.kernels.dw import _dw_kernel
    ty = TRITON_TYPES[dtype]
    tma_x = tma_loads if tma_x is None else tma_x
    tma_dy = tma_loads if tma_dy is None else tma_dy
    sig = {"x_ptr": f"*{ty}", "dy_ptr": f"*{ty}", "dw_ptr": f"*{ty}",
           "dw_desc": _desc(ty, 1, block_n, block_k), "m_sizes_ptr": "*i32",
           "gather_ptr": "*i32", "E": "i32", "M": "i32", "TOPK": "i32", "num_programs": "i32",
           "stride_de": "i64", "stride_dn": "i64", "stride_dk": "i64"}
    consts = dict(N=n, K=k, PERMUTE_X=permute_x, PERMUTE_Y=permute_y,
                  TMA_X=tma_x and not permute_x, TMA_DY=tma_dy and not permute_y,
                  TMA_DW=tma_store, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                  E_POW2=128, UPCAST_DOT=False, IEEE_DOT=dtype == "float32")
    if not tma_store:
        consts["dw_desc"] = None
    return _compile(_dw_kernel, sig, consts, num_warps, num_stages)


def compile_config(op, config, dtype="bfloat16", *, permute_x=False, permute_y=False,
                   fuse_mul_post=False, store_unweighted=False, n=1536, k=2048):
    """Compile ``op``'s kernel as the launcher runs ``config`` on Hopper for these fusions
    and dtype (TMA switches honoured as a launch on aligned tensors honours them; the
    forward's and dX's TMA store switches are ignored by the launchers, as here)."""
    tile = (config.block_m, config.block_n, config.block_k, config.num_warps,
            config.num_stages)
    if op == "forward":
        return compile_forward(*tile, permute_x=permute_x, permute_y=permute_y,
                               fuse_mul=fuse_mul_post, tma_x=config.tma_load_x,
                               tma_w=config.tma_load_w, store_unweighted=store_unweighted,
                               warp_specialize=config.warp_specialize,
                               group_m=config.group_m, dtype=dtype, n=n, k=k)
    if op == "dX":
        return compile_dx(*tile, permute_x=permute_x, permute_y=permute_y,
                          tma_dy=config.tma_load_dy, tma_w=config.tma_load_w,
                          group_m=config.group_m, dtype=dtype, n=n, k=k)
    if op == "dW":
        return compile_dw(*tile, tma_x=config.tma_load_x, tma_dy=config.tma_load_dy,
                          tma_store=config.tma_store_dw, permute_x=permute_x,
                          permute_y=permute_y, dtype=dtype, n=n, k=k)
    raise ValueError(f"unknown op {op!r}")


def compile_elementwise(dtype="float32", *, inter=768, hidden=2048):
    """The MoE block's passes with fixed tiles, at their launchers' defaults: {name: compiled}
    (SiLU-gating and its backward, the combine pass and its backward)."""
    from triton_gg.kernels.combine import _combine_backward_kernel, _combine_kernel
    from triton_gg.kernels.silu_mul import _silu_mul_kernel
    from triton_gg.kernels.swiglu_backward import _swiglu_backward_kernel
    ty = TRITON_TYPES[dtype]
    gate = dict(I=inter, BLOCK_M=32, BLOCK_I=128, E_POW2=128)
    return {
        "silu_mul": _compile(_silu_mul_kernel, {"h_ptr": f"*{ty}", "a_ptr": f"*{ty}",
                                                "m_sizes_ptr": "*i32"}, gate, 4, 3),
        "swiglu_backward": _compile(_swiglu_backward_kernel,
                                    {"h_ptr": f"*{ty}", "da_ptr": f"*{ty}", "dh_ptr": f"*{ty}",
                                     "m_sizes_ptr": "*i32"}, gate, 4, 3),
        "combine": _compile(_combine_kernel, {"y_ptr": f"*{ty}", "w_ptr": "*fp32",
                                              "pos_ptr": "*i32", "m_sizes_ptr": "*i32",
                                              "out_ptr": f"*{ty}"},
                            dict(TOPK=8, H=hidden, BLOCK_T=4, BLOCK_H=512, E_POW2=128), 4, 3),
        "combine_backward": _compile(
            _combine_backward_kernel,
            {"y_ptr": f"*{ty}", "w_ptr": "*fp32", "pos_ptr": "*i32", "m_sizes_ptr": "*i32",
             "do_ptr": f"*{ty}", "dy_ptr": f"*{ty}", "dw_ptr": "*fp32"},
            dict(H=hidden, BLOCK_R=8, BLOCK_H=256, E_POW2=128, NEED_DW=True), 4, 3),
    }


def shared_of(cases):
    """Compile each case ``{"op", "config" (gg_spec.config_to_dict), "dtype", "flags"}`` and
    return the shared memory (bytes) of each, or the error it raised as a string."""
    from gg_spec import config_from_dict
    out = []
    for case in cases:
        try:
            compiled = compile_config(case["op"], config_from_dict(case["config"]),
                                      case["dtype"], **case.get("flags", {}))
            out.append(compiled.metadata.shared)
        except Exception as exc:  # reported by the caller
            out.append(f"{type(exc).__name__}: {str(exc)[:500]}")
    return out


def main(argv=None) -> int:
    """``python -m triton_gg.kernels.compile_sm90 IN.json OUT.json`` (TRITON_INTERPRET=0):
    ``shared_of`` of the cases in IN, written to OUT; ``--elementwise DTYPE OUT.json`` the
    shared memory of the fixed-tile passes."""
    import json
    import sys
    argv = sys.argv[1:] if argv is None else argv
    ok, why = can_compile()
    if not ok:
        print(f"cannot compile for sm_90: {why}", file=sys.stderr)
        return 3
    if argv[0] == "--elementwise":
        result = {name: c.metadata.shared
                  for name, c in compile_elementwise(argv[1]).items()}
        out_path = argv[2]
    else:
        with open(argv[0]) as f:
            result = shared_of(json.load(f))
        out_path = argv[1]
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
