"""Device mode of the harness: inputs, float64 reference and comparisons where the backends run.

The host mode (``parity.inputs.Inputs`` + ``gg_spec.reference``) draws every input in numpy and
computes the float64 reference on the host. At real model sizes that is minutes per case (a W of
1.3e9 elements drawn in float64, float64 matmuls on the CPU). The device mode keeps everything on
the torch device (a GPU; CPU tensors too, which is how the CPU tests exercise this code path):

* inputs (``DeviceInputs``): X, W, dY drawn with a seeded ``torch.Generator`` on the device, in
  float32 and rounded once to the case dtype (W scaled by 1/sqrt(K)); the routing is still
  ``gg_spec.make_routing`` in numpy (small), with exactly the rng the host mode uses, so both modes
  route identically. Every tensor has its own generator seed, so W is the same for every fusion and
  op of a shape and is drawn once: a one-entry cache (``_CACHE``) keeps the tensors of the current
  (shape, tokens, top-k, dtype, seed, routing, device) and drops them when the sweep moves on. JAX
  backends get the same buffers through DLPack (``Inputs.jax``).
* reference (``reference_outputs_torch``): ``parity.reference``, float64 torch on the device, one
  op at a time (the harness frees it before the next op).
* comparisons (``compare_tensors``): rel error, max abs error and the pairwise agreements on the
  device, in float64 chunks (no float64 copy of a whole output), one host sync per comparison
  bringing back three scalars.
* outputs (``to_device_tensor``): torch outputs stay as they are; JAX outputs become torch tensors
  through DLPack (zero-copy); numpy outputs (test backends) are moved to the device.

The harness picks this mode with ``reference="torch"`` (``--reference torch``), and by default
whenever the torch device is cuda; ``gg_spec.reference`` stays the ground truth of the host mode and,
through the CPU test of ``parity.reference``, of this one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from gg_spec.cases import round_to_dtype
from gg_spec.routing import make_routing
from parity.inputs import FLOAT_KEYS, INDEX_KEYS, Inputs, resolve_device, torch_dtype
from parity.report import TypedArray, to_float64

REFERENCES = ("auto", "numpy", "torch")

# Generator streams: every tensor has its own seed, so each can be drawn (or redrawn after a
# backend wrote into it) alone, in any order.
_STREAMS = {"x:T": 1, "x:M": 2, "w": 3, "dy": 4}
# Random numbers are drawn in float32 chunks of this many elements (bounded temporary memory).
_DRAW_CHUNK = 1 << 26
# Comparisons upcast chunks of this many elements to float64 (2 temporaries of 256 MB).
_COMPARE_CHUNK = 1 << 25
# Inputs up to this many elements are checked for modification against a pristine copy on the
# device; above (a real model's W), against a pristine strided sample of ~4M elements.
_EXACT_CHECK_MAX_ELEMS = 1 << 28
_SAMPLE_ELEMS = 1 << 22
# The numpy backend (gg_spec's reference on host copies) runs in device mode up to this W size
# and is skipped above (that host reference is what device mode exists to avoid).
HOST_REFERENCE_MAX_ELEMS = 1 << 24


def _torch():
    import torch
    return torch


def _seed(seed: int, stream: int) -> int:
    return (int(seed) * 1_000_003 + stream * 7_919) % (1 << 63)


def _sync(device: str) -> None:
    """Wait for the device's work (JAX reads the torch buffers on its own stream)."""
    if device.startswith("cuda"):
        _torch().cuda.synchronize()


def _draw(shape, dtype: str, device: str, seed: int, scale: float | None = None):
    """Standard normal values in float32 (times ``scale``), rounded once to ``dtype``: the same
    construction as ``gg_spec.cases.make_inputs``, drawn by a torch generator on ``device``."""
    torch = _torch()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = torch.empty(shape, dtype=torch_dtype(dtype), device=device)
    flat = out.view(-1)
    for lo in range(0, flat.numel(), _DRAW_CHUNK):
        n = min(_DRAW_CHUNK, flat.numel() - lo)
        chunk = torch.randn(n, generator=gen, device=device, dtype=torch.float32)
        if scale is not None:
            chunk.mul_(scale)
        flat[lo:lo + n].copy_(chunk)      # round to nearest even, like round_to_dtype
        del chunk
    return out


class _Pristine:
    """What an input looked like when it was drawn: a device copy (small inputs) or a strided
    sample (large ones), to tell whether a backend wrote into it."""

    def __init__(self, t):
        self.numel = t.numel()
        flat = t.detach().reshape(-1)
        if self.numel <= _EXACT_CHECK_MAX_ELEMS:
            self.stride = 1
            self.copy = flat.clone()
        else:
            # odd stride: the sample walks across rows and columns
            self.stride = (self.numel // _SAMPLE_ELEMS) | 1
            self.copy = flat[::self.stride].clone()

    def unchanged(self, t) -> bool:
        torch = _torch()
        flat = t.detach().reshape(-1)
        now = flat if self.stride == 1 else flat[::self.stride]
        # bitwise: NaN == NaN here, -0.0 != 0.0 does not matter for random inputs
        if now.dtype.is_floating_point:
            now = now.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[now.element_size()])
            ref = self.copy.view(now.dtype)
        else:
            ref = self.copy
        return bool(torch.equal(now, ref))


class _Entry:
    """The device tensors of one (shape, tokens, topk, dtype, seed, routing, device)."""

    def __init__(self, key, case, device: str):
        self.key, self.device = key, device
        s = case.shape
        self.dims = (s.num_experts, s.n, s.k, case.tokens, case.topk)
        self.dtype, self.seed = case.dtype, case.seed
        # the routing exactly as gg_spec.cases.make_inputs draws it (first use of its rng)
        routing = make_routing(case.routing, case.tokens, s.num_experts, s.topk,
                               np.random.default_rng(case.seed))
        self.host = {
            "topk_ids": routing.topk_ids,
            "m_sizes": routing.m_sizes,
            "gather_indices": routing.gather_indices,
            "topk_weights": round_to_dtype(routing.topk_weights, case.dtype),
        }
        self.tensors: dict = {}
        self.pristine: dict[str, _Pristine] = {}

    def get(self, name: str):
        if name not in self.tensors:
            self.tensors[name] = t = self._make(name)
            self.pristine[name] = _Pristine(t)
            _sync(self.device)
        return self.tensors[name]

    def _make(self, name: str):
        torch = _torch()
        e, n, k, tokens, topk = self.dims
        m = tokens * topk
        if name in INDEX_KEYS:
            return torch.from_numpy(np.array(self.host[name], dtype=np.int32)).to(self.device)
        if name == "topk_weights":
            # float32 values already rounded to the dtype: the cast is exact
            return torch.from_numpy(self.host[name].copy()).to(
                device=self.device, dtype=torch_dtype(self.dtype))
        shapes = {"x:T": (tokens, k), "x:M": (m, k), "w": (e, n, k), "dy": (m, n)}
        scale = 1.0 / math.sqrt(k) if name == "w" else None
        return _draw(shapes[name], self.dtype, self.device,
                     _seed(self.seed, _STREAMS[name]), scale)

    def forget(self) -> None:
        """Drop every tensor: the next access redraws them (same seeds, same values)."""
        self.tensors.clear()
        self.pristine.clear()


class _InputCache:
    """One entry at a time: a sweep visits each shape's fusions and ops in a row, and a real
    model's W (up to 4 GB in bf16) should not outlive its shape."""

    def __init__(self):
        self.entry: _Entry | None = None

    @staticmethod
    def key(case, device: str):
        s = case.shape
        return (s.num_experts, s.n, s.k, case.tokens, case.topk, case.dtype, case.seed,
                case.routing, device)

    def get(self, case, device: str) -> _Entry:
        key = self.key(case, device)
        if self.entry is None or self.entry.key != key:
            self.clear()
            self.entry = _Entry(key, case, device)
        return self.entry

    def clear(self) -> None:
        """Free the cached tensors (and, on a GPU, torch's cached blocks, for JAX's sake)."""
        if self.entry is None:
            return
        device = self.entry.device
        self.entry.forget()
        self.entry = None
        if device.startswith("cuda"):
            _torch().cuda.empty_cache()


_CACHE = _InputCache()


def clear_cache() -> None:
    """Free the device inputs kept for the current shape (the CLI calls it after a sweep)."""
    _CACHE.clear()


class _HostArrays(Mapping):
    """``DeviceInputs.np``: the routing arrays (drawn on the host) as they are; X, W, dY copied
    from the device on first access only (float32, exact for every case dtype). Only the numpy
    backend and a JAX that cannot share the torch device read them."""

    def __init__(self, inputs: "DeviceInputs"):
        self._inputs = inputs
        self._copies: dict = {}

    def __getitem__(self, key):
        entry = self._inputs.entry
        if key in entry.host:
            return entry.host[key]
        if key not in ("x", "w", "dy"):
            raise KeyError(key)
        if key not in self._copies:
            torch = _torch()
            t = self._inputs.torch(key)
            self._copies[key] = t.detach().to(device="cpu", dtype=torch.float32,
                                              copy=True).numpy()
        return self._copies[key]

    def __iter__(self):
        return iter(FLOAT_KEYS + INDEX_KEYS)

    def __len__(self):
        return len(FLOAT_KEYS + INDEX_KEYS)

    def clear(self):
        self._copies.clear()


class DeviceInputs(Inputs):
    """The inputs of one case drawn on the torch device (see the module docstring). Same
    interface as ``Inputs``: ``.torch(key)``, ``.jax(key)``, ``.np`` (lazy host copies),
    ``reset()``, ``changed_inputs()``."""

    reference = "torch"
    host_reference_max_elems = HOST_REFERENCE_MAX_ELEMS

    def __init__(self, case, device: str | None = None):
        self.case = case
        self._device_arg = device
        self._device = resolve_device(device)
        self._torch: dict = {}
        self._jax: dict = {}
        self.entry = _CACHE.get(case, self._device)
        self.np = _HostArrays(self)

    @staticmethod
    def _name(case, key: str) -> str:
        if key == "x":
            return "x:T" if case.fusion.permute_x else "x:M"
        return key

    def torch(self, key: str):
        """The input as a torch tensor on ``self.device`` (float keys in the case dtype, index
        keys int32), shared with every case of the same shape. Backends must not modify it."""
        if key not in self._torch:
            if key not in FLOAT_KEYS + INDEX_KEYS:
                raise KeyError(key)
            self._torch[key] = self.entry.get(self._name(self.case, key))
        return self._torch[key]

    def reset(self) -> None:
        """A backend wrote into an input: redraw them all (same seeds, same values)."""
        super().reset()
        self.np.clear()
        self.entry.forget()

    def changed_inputs(self) -> list[str]:
        """Names of inputs no longer equal to what was drawn: every element of inputs up to
        2^28 elements, a strided sample of larger ones (compared on the device)."""
        changed = []
        for key, t in self._torch.items():
            pristine = self.entry.pristine.get(self._name(self.case, key))
            if pristine is not None and not pristine.unchanged(t):
                changed.append(key)
        return changed


# ---------------------------------------------------------------------------- reference

def reference_outputs_torch(case, inputs: DeviceInputs, op: str) -> dict:
    """The float64 reference of one op on the device (``parity.reference``), same output names
    as ``parity.backends.reference_outputs``."""
    from parity import reference
    f, k = case.fusion, case.topk
    ms = inputs.np["m_sizes"]                 # host copy: no device sync for the bounds
    g = inputs.torch("gather_indices")
    route = (ms, g, k)
    kw = {"permute_x": f.permute_x, "permute_y": f.permute_y}
    tw = inputs.torch("topk_weights") if f.fuse_mul_post else None
    x, w, dy = (inputs.torch(n) for n in ("x", "w", "dy"))
    if op == "forward":
        return {"Y": reference.forward(x, w, *route, **kw, topk_weights=tw,
                                       fuse_mul_post=f.fuse_mul_post)}
    if op == "dX":
        return {"dX": reference.dX(dy, w, *route, **kw)}
    if op == "dW":
        return {"dW": reference.dW(x, dy, *route, **kw)}
    if op == "autograd":
        y = reference.forward(x, w, *route, **kw, topk_weights=tw,
                              fuse_mul_post=f.fuse_mul_post)
        dx, dw, dtw = reference.grouped_gemm_grads(x, w, *route, dy, **kw, topk_weights=tw,
                                                   fuse_mul_post=f.fuse_mul_post)
        out = {"Y": y, "dX_total": dx, "dW": dw}
        if f.fuse_mul_post:
            out["d_topk_weights"] = dtw
        return out
    raise ValueError(f"unknown op {op!r}")


# ---------------------------------------------------------------------------- outputs

def to_device_tensor(a, device: str):
    """(torch tensor on ``device``, dtype name) of a backend output, without a host round trip
    for torch and (same-device) JAX outputs. Raises TypeError for anything else."""
    torch = _torch()
    import sys
    if isinstance(a, TypedArray):
        host = np.ascontiguousarray(a.array, dtype=np.float64)
        return torch.from_numpy(host).to(device), a.dtype
    if isinstance(a, np.ndarray):
        name = str(a.dtype)
        try:
            t = torch.from_numpy(np.ascontiguousarray(a))
        except TypeError:          # e.g. ml_dtypes bfloat16
            t = torch.from_numpy(a.astype(np.float64))
        return t.to(device), name
    if isinstance(a, torch.Tensor):
        return a.detach().to(device), str(a.dtype).replace("torch.", "")
    if "jax" in sys.modules:
        import jax
        if isinstance(a, jax.Array):
            name = str(a.dtype)
            a.block_until_ready()
            try:
                t = torch.from_dlpack(a)           # same buffer, no copy
            except Exception:  # noqa: BLE001 - an unsupported layout or device: via the host
                t = torch.from_numpy(to_float64(a)[0])
            return t.to(device), name
    raise TypeError(f"cannot convert output of type {type(a).__name__} to a tensor")


# ---------------------------------------------------------------------------- comparison

def compare_tensors(out, ref, tol: float) -> tuple[float, float, bool, str]:
    """``parity.compare`` on torch tensors, on their device: (rel error ||out-ref||/||ref||,
    max abs error, passed, note) in float64, with the same rules (shape mismatch and non-finite
    values fail with a note; 0 when both are zero). ``ref`` may be any dtype (the float64
    reference, or another backend's output for an agreement). Works through chunks upcast to
    float64 (each chunk read once more for the difference: ~40 bytes of memory traffic per
    element of a float64 reference) and brings back three scalars."""
    torch = _torch()
    if tuple(out.shape) != tuple(ref.shape):
        return (math.inf, math.inf, False,
                f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
    n = out.numel()
    if n == 0:
        return 0.0, 0.0, True, ""
    if ref.device != out.device:
        ref = ref.to(out.device)
    o, r = out.detach().reshape(-1), ref.detach().reshape(-1)
    f64 = dict(dtype=torch.float64, device=o.device)
    sq, mx, rsq = torch.zeros((), **f64), torch.zeros((), **f64), torch.zeros((), **f64)
    for lo in range(0, n, _COMPARE_CHUNK):
        rc = r[lo:lo + _COMPARE_CHUNK].to(torch.float64)     # no copy for the reference
        d = o[lo:lo + _COMPARE_CHUNK] - rc                   # promotes to float64, exact
        sq += torch.dot(d, d)
        mx = torch.maximum(mx, torch.linalg.vector_norm(d, ord=math.inf))
        rsq += torch.dot(rc, rc)
        del rc, d
    sq_v, mx_v, rsq_v = torch.stack([sq, mx, rsq]).tolist()
    if not math.isfinite(sq_v):           # rare: count the non-finite values
        bad_v = sum(int((~torch.isfinite(o[lo:lo + _COMPARE_CHUNK])).sum())
                    for lo in range(0, n, _COMPARE_CHUNK))
        if bad_v:
            return math.inf, math.inf, False, f"{int(bad_v)} non-finite values"
        # finite values whose squares overflow: scale before squaring
        rel = _scaled_rel_error(o, r)
        return rel, _max_abs(o, r), rel <= tol, ""
    if not math.isfinite(rsq_v):
        rel = _scaled_rel_error(o, r)
        return rel, mx_v, rel <= tol, ""
    norm = math.sqrt(rsq_v)
    if norm == 0.0:
        rel = 0.0 if sq_v == 0.0 else math.inf
    else:
        rel = math.sqrt(sq_v) / norm
    return rel, mx_v, rel <= tol, ""


def _chunks(o, r):
    torch = _torch()
    for lo in range(0, o.numel(), _COMPARE_CHUNK):
        yield (o[lo:lo + _COMPARE_CHUNK].to(torch.float64),
               r[lo:lo + _COMPARE_CHUNK].to(torch.float64))


def _max_abs(o, r) -> float:
    torch = _torch()
    mx = torch.zeros((), dtype=torch.float64, device=o.device)
    for oc, rc in _chunks(o, r):
        mx = torch.maximum(mx, (oc - rc).abs().max())
    return float(mx)


def _scaled_norm(parts) -> float:
    """||v|| of a vector given as chunks, without overflow: max |v| times ||v / max |v| ||."""
    torch = _torch()
    parts = list(parts)
    scale = max((float(p.abs().max()) for p in parts if p.numel()), default=0.0)
    if scale == 0.0 or not math.isfinite(scale):
        return scale
    total = sum(float(torch.dot(p / scale, p / scale)) for p in parts)
    return scale * math.sqrt(total)


def _scaled_rel_error(o, r) -> float:
    diff = _scaled_norm(oc - rc for oc, rc in _chunks(o, r))
    norm = _scaled_norm(rc for _, rc in _chunks(o, r))
    if not math.isfinite(diff) or not math.isfinite(norm):
        return math.inf
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


__all__ = ["DeviceInputs", "HOST_REFERENCE_MAX_ELEMS", "REFERENCES", "clear_cache",
           "compare_tensors", "reference_outputs_torch", "to_device_tensor"]
