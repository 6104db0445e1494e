"""The backends the harness compares, one small class each, and their registry.

A backend turns one (case, op) into outputs. ``run`` returns a dict of output name -> array in
the backend's own framework (numpy, torch or JAX); the harness converts them to float64 and
checks their dtype. Output names per op:

* forward:  Y [M, N]
* dX:       dX [M, K] (with permute_x in routed-row order)
* dW:       dW [E, N, K]
* autograd: Y, dX_total ([T, K] with permute_x, else [M, K]), dW, and d_topk_weights [M]
            when fuse_mul_post

Frameworks are imported lazily inside each backend, so ``--backends numpy,torch`` runs without
JAX installed. A backend signals that it cannot run by raising:

* ``Unavailable``: it cannot run here at all (package missing, import fails, a function of the
  contract is missing). Raised by ``check_available`` or per op by ``run``.
* ``Skip``: it does not apply to this case or op (an external reference that has no fusions,
  a size it cannot take). Not a failure, even for a requested backend.

Any other exception is an error of the backend and fails the report.

``register_backend`` adds backends (tests register deliberately broken ones, see ``Perturbed``;
``python -m parity --plugin FILE_OR_MODULE`` imports a module that registers some).
"""

from __future__ import annotations

import contextlib
import importlib
import re

import numpy as np

from gg_spec import reference
from gg_spec.routing import expert_offsets


class Unavailable(Exception):
    """The backend cannot run here (missing package, failing import, missing function)."""


class Skip(Exception):
    """The backend does not apply to this case/op; not a failure."""


# ---------------------------------------------------------------------------- base class

class Backend:
    """One implementation of the contract. Subclasses set ``name`` and ``framework`` and
    implement ``run``; ``check_available`` and ``check_applies`` default to "yes"."""

    name: str = "?"
    framework: str = "numpy"     # numpy | torch | jax: which inputs/outputs it uses
    description: str = ""
    checks_dtype: bool = True    # outputs must come back in the case dtype (the contract)

    def check_available(self) -> None:
        """Raise Unavailable(reason) if the backend cannot run in this environment."""

    def check_applies(self, case, op: str) -> None:
        """Raise Skip(reason) if the backend does not cover this case/op."""

    def run(self, case, inputs, op: str) -> dict:
        """Outputs of `op` for `case` on `inputs` (parity.inputs.Inputs)."""
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


def _import(module: str):
    """Import a module or raise Unavailable with the reason (any exception: the packages are
    being written while the harness runs, and a SyntaxError must not crash the harness)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable"
        raise Unavailable(f"import {module} failed: {type(e).__name__}: {e}") from e


def _attr(mod, name: str):
    fn = getattr(mod, name, None)
    if fn is None:
        raise Unavailable(f"{mod.__name__}.{name} does not exist")
    return fn


CONTRACT_FUNCTIONS = ("grouped_gemm_forward", "grouped_gemm_dX", "grouped_gemm_dW",
                      "grouped_gemm")


def _import_contract(module: str):
    """Import a package of the contract; Unavailable if it has none of its functions yet (a
    package with some of them runs those ops; the others report their function missing)."""
    mod = _import(module)
    if not any(hasattr(mod, fn) for fn in CONTRACT_FUNCTIONS):
        raise Unavailable(f"{module} has none of {', '.join(CONTRACT_FUNCTIONS)}")
    return mod


def _fusion_kw(case) -> dict:
    f = case.fusion
    return {"permute_x": f.permute_x, "permute_y": f.permute_y}


def _run_direct(mod, op, case, X, W, dY, tw, ms, g, configs, kw) -> dict:
    """forward / dX / dW through the contract's direct functions of `mod` (triton_gg and
    pallas_gg share names and arguments); configs = (forward, dX, dW) configs or None."""
    f, k = case.fusion, case.topk
    if op == "forward":
        fn = _attr(mod, "grouped_gemm_forward")
        return {"Y": fn(X, W, ms, g, k, **kw, topk_weights=tw if f.fuse_mul_post else None,
                        fuse_mul_post=f.fuse_mul_post, config=configs[0])}
    if op == "dX":
        return {"dX": _attr(mod, "grouped_gemm_dX")(dY, W, ms, g, k, **kw, config=configs[1])}
    return {"dW": _attr(mod, "grouped_gemm_dW")(X, dY, ms, g, k, **kw, config=configs[2])}


def _expert_bounds(m_sizes: np.ndarray) -> list[tuple[int, int, int]]:
    """[(e, lo, hi)]: expert e owns expert-order positions [lo, hi)."""
    offs = expert_offsets(m_sizes)
    return [(e, int(offs[e]), int(offs[e + 1])) for e in range(len(m_sizes))]


# ---------------------------------------------------------------------------- numpy

class NumpyReference(Backend):
    """gg_spec's float64 reference itself: a sanity check of the harness plumbing (its error
    must be exactly 0)."""

    name = "numpy"
    framework = "numpy"
    description = "gg_spec float64 reference (sanity: error 0)"
    checks_dtype = False

    def run(self, case, inputs, op):
        limit = getattr(inputs, "host_reference_max_elems", None)
        if limit is not None:
            # device mode (parity.device): the inputs live on the torch device and the float64
            # reference is computed there; this backend then re-checks it against gg_spec on
            # host copies, where that is cheap
            s = case.shape
            elems = s.num_experts * s.n * s.k
            if elems > limit:
                raise Skip(f"host reference skipped in device mode: W has {elems:.1e} "
                           f"elements (> {limit:.1e})")
        return reference_outputs(case, inputs.np, op)


def reference_outputs(case, arrays: dict, op: str) -> dict[str, np.ndarray]:
    """The float64 reference of one op on `arrays` (gg_spec.cases.make_inputs keys)."""
    a, f, k = arrays, case.fusion, case.topk
    route = (a["m_sizes"], a["gather_indices"], k)
    kw = _fusion_kw(case)
    tw = a["topk_weights"] if f.fuse_mul_post else None
    if op == "forward":
        return {"Y": reference.forward(a["x"], a["w"], *route, **kw, topk_weights=tw,
                                       fuse_mul_post=f.fuse_mul_post)}
    if op == "dX":
        return {"dX": reference.dX(a["dy"], a["w"], *route, **kw)}
    if op == "dW":
        return {"dW": reference.dW(a["x"], a["dy"], *route, **kw)}
    if op == "autograd":
        y = reference.forward(a["x"], a["w"], *route, **kw, topk_weights=tw,
                              fuse_mul_post=f.fuse_mul_post)
        dx, dw, dtw = reference.grouped_gemm_grads(a["x"], a["w"], *route, a["dy"], **kw,
                                                   topk_weights=tw,
                                                   fuse_mul_post=f.fuse_mul_post)
        out = {"Y": y, "dX_total": dx, "dW": dw}
        if f.fuse_mul_post:
            out["d_topk_weights"] = dtw
        return out
    raise ValueError(f"unknown op {op!r}")


# ---------------------------------------------------------------------------- torch (plain ops)

@contextlib.contextmanager
def _ieee_fp32_matmul():
    """fp32 matmuls in full IEEE precision (no TF32) inside the block, as the contract asks."""
    import torch
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _inverse_permutation(g):
    """inv with inv[g[p]] = p, so ``a[inv]`` scatters expert-order rows to routed order."""
    import torch
    inv = torch.empty_like(g)
    inv[g] = torch.arange(g.numel(), device=g.device, dtype=g.dtype)
    return inv


def torch_forward(x, w, g, bounds, topk: int, fusion, tw=None):
    """Y [M, N] in plain torch ops (differentiable): per-expert ``x_e @ W[e].T`` after the
    gather, the routing-weight scale and the scatter. x [T|M, K], w [E, N, K], g [M] int64.

    split/unbind rather than slicing: their backward assembles each gradient once (slicing
    W per expert would make autograd build and add E zero-padded copies of dW)."""
    import torch
    x_exp = x[g // topk] if fusion.permute_x else x
    xs = x_exp.split([hi - lo for _, lo, hi in bounds])
    ws = w.unbind(0)
    y = torch.cat([xs[e] @ ws[e].T for e, lo, hi in bounds])
    if fusion.fuse_mul_post:
        y = y * tw[g][:, None]
    return y[_inverse_permutation(g)] if fusion.permute_y else y


def torch_dX(dy, w, g, bounds, topk: int, fusion):
    """dX [M, K]: ``dY[row(p)] @ W[e(p)]``, stored at g[p] with permute_x."""
    import torch
    dy_exp = dy[g] if fusion.permute_y else dy
    dx = torch.cat([dy_exp[lo:hi] @ w[e] for e, lo, hi in bounds])
    return dx[_inverse_permutation(g)] if fusion.permute_x else dx


def torch_dW(x, dy, g, bounds, topk: int, fusion):
    """dW [E, N, K]: ``sum_p dY[row(p)]^T X[row(p)]`` per expert (zero for an empty one)."""
    import torch
    x_exp = x[g // topk] if fusion.permute_x else x
    dy_exp = dy[g] if fusion.permute_y else dy
    dw = x_exp.new_empty((len(bounds), dy.shape[1], x.shape[1]))
    for e, lo, hi in bounds:      # into the output: no list of E matrices to stack
        torch.matmul(dy_exp[lo:hi].T, x_exp[lo:hi], out=dw[e])
    return dw


class TorchReference(Backend):
    """Plain torch ops, no custom kernels: per-expert fp32 matmuls on upcast inputs (fp32
    accumulation), indexing for gather/scatter, torch.autograd for the autograd op; outputs
    rounded to the input dtype like the kernels'."""

    name = "torch"
    framework = "torch"
    description = "plain torch ops (per-expert fp32 matmul, autograd)"

    def check_available(self):
        _import("torch")

    def run(self, case, inputs, op):
        f, k = case.fusion, case.topk

        def up(name):     # fp32 copies of only the inputs this op reads (a real W: GBs)
            return inputs.torch(name).detach().float()
        g = inputs.torch("gather_indices").long()
        bounds = _expert_bounds(inputs.np["m_sizes"])
        with _ieee_fp32_matmul():
            if op == "forward":
                out = {"Y": torch_forward(up("x"), up("w"), g, bounds, k, f,
                                          up("topk_weights"))}
            elif op == "dX":
                out = {"dX": torch_dX(up("dy"), up("w"), g, bounds, k, f)}
            elif op == "dW":
                out = {"dW": torch_dW(up("x"), up("dy"), g, bounds, k, f)}
            else:
                out = self._autograd(up("x"), up("w"), up("dy"), up("topk_weights"), g,
                                     bounds, k, f)
        dtype = inputs.torch("x").dtype
        for name in list(out):    # one at a time: each fp32 result is freed once rounded
            out[name] = out[name].detach().to(dtype)
        return out

    @staticmethod
    def _autograd(x, w, dy, tw, g, bounds, k, f):
        import torch
        leaves = [x.requires_grad_(), w.requires_grad_()]
        if f.fuse_mul_post:
            leaves.append(tw.requires_grad_())
        y = torch_forward(x, w, g, bounds, k, f, tw)
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
        grads = [torch.zeros_like(l) if gr is None else gr for l, gr in zip(leaves, grads)]
        out = {"Y": y, "dX_total": grads[0], "dW": grads[1]}
        if f.fuse_mul_post:
            out["d_topk_weights"] = grads[2]
        return out


# ---------------------------------------------------------------------------- triton_gg

class TritonGG(Backend):
    """The project's PyTorch + Triton kernels (Triton interpreter on CPU tensors)."""

    framework = "torch"
    description = "triton_gg (Triton kernels; interpreter on CPU)"

    def __init__(self, name: str = "triton_gg", *, forward_config=None, dx_config=None,
                 dw_config=None, autotune: bool = False):
        self.name = name
        self.forward_config, self.dx_config, self.dw_config = forward_config, dx_config, dw_config
        self.autotune = autotune

    def check_available(self):
        _import_contract("triton_gg")

    def run(self, case, inputs, op):
        mod = _import("triton_gg")
        k = case.topk
        X, W, dY, tw = (inputs.torch(n) for n in ("x", "w", "dy", "topk_weights"))
        ms, g = inputs.torch("m_sizes"), inputs.torch("gather_indices")
        kw = _fusion_kw(case)
        if op in ("forward", "dX", "dW"):
            return _run_direct(mod, op, case, X, W, dY, tw, ms, g,
                               (self.forward_config, self.dx_config, self.dw_config), kw)
        return self._autograd(_attr(mod, "grouped_gemm"), X, W, dY, tw, ms, g, k, case)

    def _autograd(self, fn, X, W, dY, tw, ms, g, k, case):
        import torch
        f = case.fusion
        # detach() gives fresh leaves that share the inputs' storage (no copy)
        leaves = [X.detach().requires_grad_(), W.detach().requires_grad_()]
        if f.fuse_mul_post:
            leaves.append(tw.detach().requires_grad_())
        y = fn(leaves[0], leaves[1], ms, g, k, **_fusion_kw(case),
               topk_weights=leaves[2] if f.fuse_mul_post else None,
               fuse_mul_post=f.fuse_mul_post, forward_config=self.forward_config,
               dx_config=self.dx_config, dw_config=self.dw_config, autotune=self.autotune)
        grads = torch.autograd.grad(y, leaves, dY, allow_unused=True)
        if any(gr is None for gr in grads):
            missing = [n for n, gr in zip(("X", "W", "topk_weights"), grads) if gr is None]
            raise AssertionError(f"grouped_gemm gave no gradient for {missing}")
        out = {"Y": y.detach(), "dX_total": grads[0], "dW": grads[1]}
        if f.fuse_mul_post:
            out["d_topk_weights"] = grads[2]
        return out


# ---------------------------------------------------------------------------- pallas_gg

class PallasGG(Backend):
    """The project's JAX + Pallas kernels (interpret mode on CPU). ``lowering`` is passed as
    ``backend=`` ("auto" is left to the default)."""

    framework = "jax"
    description = "pallas_gg (Pallas kernels; interpret mode on CPU)"

    def __init__(self, name: str = "pallas_gg", lowering: str = "auto", *,
                 forward_config=None, dx_config=None, dw_config=None, autotune: bool = False):
        self.name, self.lowering = name, lowering
        self.forward_config, self.dx_config, self.dw_config = forward_config, dx_config, dw_config
        self.autotune = autotune
        if lowering != "auto":
            self.description = f"pallas_gg with backend={lowering!r}"

    def _lowering_kw(self) -> dict:
        return {} if self.lowering == "auto" else {"backend": self.lowering}

    def check_available(self):
        _import("jax")
        _import_contract("pallas_gg")

    def run(self, case, inputs, op):
        if self.lowering != "mosaic":
            return self._run(case, inputs, op)
        try:
            return self._run(case, inputs, op)
        except NotImplementedError as e:   # the Mosaic lowering: fp32 is not for wgmma
            if "bf16 and fp16 only" not in str(e):
                raise
            raise Skip(f"backend='mosaic': {e}") from None
        except ValueError as e:
            if "whole TMA" not in str(e):
                raise
            raise Skip(f"backend='mosaic': {e}") from None

    def _run(self, case, inputs, op):
        mod = _import("pallas_gg")
        k = case.topk
        X, W, dY, tw = (inputs.jax(n) for n in ("x", "w", "dy", "topk_weights"))
        ms, g = inputs.jax("m_sizes"), inputs.jax("gather_indices")
        kw = {**_fusion_kw(case), **self._lowering_kw()}
        if op in ("forward", "dX", "dW"):
            return _run_direct(mod, op, case, X, W, dY, tw, ms, g,
                               (self.forward_config, self.dx_config, self.dw_config), kw)
        return self._autograd(_attr(mod, "grouped_gemm"), X, W, dY, tw, ms, g, k, case, kw)

    def _autograd(self, fn, X, W, dY, tw, ms, g, k, case, kw):
        import jax
        f = case.fusion

        def op(x, w, weights=None):
            return fn(x, w, ms, g, k, **kw, topk_weights=weights,
                      fuse_mul_post=f.fuse_mul_post, forward_config=self.forward_config,
                      dx_config=self.dx_config, dw_config=self.dw_config,
                      autotune=self.autotune)

        primals = (X, W, tw) if f.fuse_mul_post else (X, W)
        y, vjp = jax.vjp(op, *primals)
        grads = vjp(dY)
        out = {"Y": y, "dX_total": grads[0], "dW": grads[1]}
        if f.fuse_mul_post:
            out["d_topk_weights"] = grads[2]
        return out


# ---------------------------------------------------------------------------- external references

def _plain_only(case, who: str):
    if case.fusion.name != "plain":
        raise Skip(f"{who} has no fusions (case is {case.fusion.name})")


class TorchGroupedMM(Backend):
    """``torch._grouped_mm`` (torch's own grouped GEMM; CUTLASS on Hopper, a fallback loop
    elsewhere, CPU included in torch 2.11) on unfused cases: forward, dX and dW as three
    grouped GEMMs with ``offs = cumsum(m_sizes)``, autograd through its derivative."""

    name = "torch_grouped_mm"
    framework = "torch"
    description = "torch._grouped_mm (unfused cases)"

    def check_available(self):
        torch = _import("torch")
        if not hasattr(torch, "_grouped_mm"):
            raise Unavailable(f"torch {torch.__version__} has no torch._grouped_mm")

    def check_applies(self, case, op):
        _plain_only(case, "torch._grouped_mm")
        if case.m == 0:
            raise Skip("torch._grouped_mm rejects 0 routed rows (its stride check)")
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[case.dtype]
        for what, size in (("K", case.shape.k), ("N", case.shape.n)):
            if (size * itemsize) % 16:
                raise Skip(f"torch._grouped_mm needs 16-byte row strides; {what}={size} "
                           f"{case.dtype} rows are {size * itemsize} bytes")

    def run(self, case, inputs, op):
        import torch
        X, W, dY = (inputs.torch(n) for n in ("x", "w", "dy"))
        offs = torch.cumsum(inputs.torch("m_sizes"), 0, dtype=torch.int32)
        gmm = torch._grouped_mm
        try:
            with _ieee_fp32_matmul():
                if op == "forward":
                    return {"Y": gmm(X, W.transpose(1, 2), offs=offs)}
                if op == "dX":
                    return {"dX": gmm(dY, W, offs=offs)}
                if op == "dW":
                    # [N, M] x [M, K] grouped along M -> [E, N, K]
                    return {"dW": gmm(dY.t(), X, offs=offs)}
                x, w = X.detach().requires_grad_(), W.detach().requires_grad_()
                y = gmm(x, w.transpose(1, 2), offs=offs)
                dx, dw = torch.autograd.grad(y, (x, w), dY)
                return {"Y": y.detach(), "dX_total": dx, "dW": dw}
        except RuntimeError as e:
            # Its CUDA path may be bf16-only (the meta registration checks "Expected inputs
            # of BF16 type"): a dtype it does not take is "does not apply", not a failure.
            if re.search(r"bf16|bfloat16", str(e), re.IGNORECASE):
                raise Skip(f"torch._grouped_mm: {str(e).splitlines()[0]}") from e
            raise


class LaxRaggedDot(Backend):
    """``jax.lax.ragged_dot`` on unfused cases: forward in HIGHEST precision with fp32
    accumulation, dX and dW (and the autograd op) through ``jax.vjp``."""

    name = "lax_ragged_dot"
    framework = "jax"
    description = "jax.lax.ragged_dot (unfused cases; grads via jax.vjp)"

    def check_available(self):
        jax = _import("jax")
        if not hasattr(jax.lax, "ragged_dot"):
            raise Unavailable(f"jax {jax.__version__} has no jax.lax.ragged_dot")

    def check_applies(self, case, op):
        _plain_only(case, "jax.lax.ragged_dot")

    def run(self, case, inputs, op):
        import jax
        import jax.numpy as jnp
        X, W, dY = (inputs.jax(n) for n in ("x", "w", "dy"))
        ms = inputs.jax("m_sizes")

        def fwd(x, w):
            # ragged_dot wants rhs [E, K, N]; accumulate in fp32, return the input dtype
            y = jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2), ms,
                                   precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)
            return y.astype(x.dtype)

        y, vjp = jax.vjp(fwd, X, W)
        if op == "forward":
            return {"Y": y}
        dx, dw = vjp(dY)
        if op == "dX":
            return {"dX": dx}
        if op == "dW":
            return {"dW": dw}
        return {"Y": y, "dX_total": dx, "dW": dw}


# ---------------------------------------------------------------------------- test helper

class Perturbed(Backend):
    """Another backend with its outputs deliberately damaged, to prove that the harness
    catches a wrong backend. Registered only by tests (or a ``--plugin``), never by default.

    how: "noise" (add `scale`·rms(out) Gaussian noise), "drop_row" (lose the last row),
    "swap_rows" (exchange the first and last rows: a gather/scatter bug), "nan" (one NaN),
    "dtype" (return float32 whatever the case dtype)."""

    HOWS = ("noise", "drop_row", "swap_rows", "nan", "dtype")

    def __init__(self, base: Backend | str, name: str, how: str = "noise", scale: float = 0.1,
                 outputs: tuple[str, ...] | None = None):
        if how not in self.HOWS:
            raise ValueError(f"how must be one of {self.HOWS}, got {how!r}")
        self.base = get_backend(base) if isinstance(base, str) else base
        self.name, self.how, self.scale, self.outputs = name, how, scale, outputs
        self.framework = self.base.framework
        self.checks_dtype = self.base.checks_dtype
        self.description = f"{self.base.name} perturbed ({how})"

    def check_available(self):
        self.base.check_available()

    def check_applies(self, case, op):
        self.base.check_applies(case, op)

    def run(self, case, inputs, op):
        from parity.report import TypedArray, to_float64
        out = self.base.run(case, inputs, op)
        rng = np.random.default_rng(0)
        damaged = {}
        for name, arr in out.items():
            a, dtype = to_float64(arr)
            if self.outputs is None or name in self.outputs:
                a = self._damage(a, rng)
            # the "dtype" damage reports float32; the others keep the base's dtype
            damaged[name] = (a.astype(np.float32) if self.how == "dtype"
                             else TypedArray(a, dtype))
        return damaged

    def _damage(self, a: np.ndarray, rng) -> np.ndarray:
        a = a.copy()
        if a.size == 0 or self.how == "dtype":
            return a
        if self.how == "noise":
            rms = np.sqrt(np.mean(a ** 2)) or 1.0
            return a + self.scale * rms * rng.standard_normal(a.shape)
        if self.how == "drop_row":
            return a[:-1]
        if self.how == "swap_rows":
            a[[0, -1]] = a[[-1, 0]]
            if np.array_equal(a[0], a[-1]):   # one row, or equal rows: still make it wrong
                a[0] += 1.0
            return a
        a.flat[a.size // 2] = np.nan
        return a


# ---------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Backend] = {}
DEFAULT_BACKENDS: list[str] = []


def register_backend(backend: Backend, *, default: bool = False, replace: bool = False) -> Backend:
    """Add `backend` under ``backend.name``. ``default`` puts it in the list that runs when no
    backends are named; ``replace`` allows re-registering a name (tests, plugins)."""
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    if default and backend.name not in DEFAULT_BACKENDS:
        DEFAULT_BACKENDS.append(backend.name)
    return backend


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name, None)
    if name in DEFAULT_BACKENDS:
        DEFAULT_BACKENDS.remove(name)


def get_backend(name: str | Backend) -> Backend:
    if isinstance(name, Backend):
        return name
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; registered: {backend_names()}") from None


def backend_names() -> list[str]:
    return list(_REGISTRY)


def load_plugin(spec: str) -> None:
    """Import a module (``pkg.mod``) or a file (``path/to/plugin.py``) that registers
    backends at import time."""
    import importlib.util
    import os
    if spec.endswith(".py") or os.sep in spec:
        name = "parity_plugin_" + os.path.splitext(os.path.basename(spec))[0]
        loader_spec = importlib.util.spec_from_file_location(name, spec)
        if loader_spec is None:
            raise ValueError(f"cannot load plugin file {spec!r}")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)


for _b in (NumpyReference(), TorchReference(), TritonGG(), PallasGG(), TorchGroupedMM(),
           LaxRaggedDot()):
    register_backend(_b, default=True)
# The two Pallas lowerings by name; not in the defaults ("pallas_gg" runs backend="auto").
register_backend(PallasGG("pallas_gg:triton", "triton"))
register_backend(PallasGG("pallas_gg:mosaic", "mosaic"))


__all__ = ["Backend", "DEFAULT_BACKENDS", "LaxRaggedDot", "NumpyReference", "PallasGG",
           "Perturbed", "Skip", "TorchGroupedMM", "TorchReference", "TritonGG", "Unavailable",
           "backend_names", "get_backend", "load_plugin", "reference_outputs",
           "register_backend", "torch_dW", "torch_dX", "torch_forward", "unregister_backend"]
