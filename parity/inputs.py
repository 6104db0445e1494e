"""One set of inputs per case, generated once and shared by every backend.

``gg_spec.cases.make_inputs`` draws float32 numpy arrays already rounded to the case dtype, so
casting them to bf16/fp16 is exact and every framework sees identical numbers. Torch tensors are
made once on the harness device; JAX arrays are made from those tensors through DLPack when both
frameworks live on the GPU (no host round trip), and from numpy otherwise.

This is the host mode. On a GPU the harness uses ``parity.device.DeviceInputs`` instead (same
interface): the inputs are drawn by torch on the device and shared by the cases of one shape.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from gg_spec.cases import make_inputs

# JAX must not grab the whole GPU when torch shares it in this process; this has to happen
# before the first `import jax` anywhere, hence at import of this module (parity imports it
# before any backend).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

FLOAT_KEYS = ("x", "w", "dy", "topk_weights")
INDEX_KEYS = ("m_sizes", "gather_indices", "topk_ids")

# Above this many elements the after-run "inputs unchanged" check is skipped: it copies each
# torch input to the host, which is nothing at test sizes but seconds for a real W.
_MUTATION_CHECK_MAX_ELEMS = 1 << 24


def torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[name]


def jax_dtype(name: str):
    import jax.numpy as jnp
    return {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[name]


def resolve_device(device: str | None) -> str:
    """'cpu' or 'cuda'. ``None``/'auto': cuda when torch sees a GPU, else cpu (torch not
    installed counts as cpu)."""
    if device in (None, "auto"):
        device = os.environ.get("PARITY_DEVICE", "auto")
    if device != "auto":
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_available() -> bool:
    return resolve_device("auto") == "cuda"


class Inputs:
    """The inputs of one case as numpy (``.np``), torch (``.torch(key)``) or JAX
    (``.jax(key)``) values. Keys (``gg_spec.cases.make_inputs``): x ([T, K] with permute_x else
    [M, K]), w [E, N, K], dy [M, N], topk_weights [M] (float, in the case dtype); m_sizes [E],
    gather_indices [M], topk_ids [T, k] (int32)."""

    def __init__(self, case, device: str | None = None, arrays: dict | None = None):
        self.case = case
        self.np: dict[str, np.ndarray] = arrays if arrays is not None else make_inputs(case)
        self._device_arg = device
        self._device: str | None = None
        self._torch: dict = {}
        self._jax: dict = {}

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = resolve_device(self._device_arg)
        return self._device

    # ------------------------------------------------------------------ torch

    def torch(self, key: str):
        """The input as a torch tensor on ``self.device`` (float keys in the case dtype,
        index keys int32). Made once; backends must not modify it."""
        if key not in self._torch:
            import torch
            # a copy: from_numpy shares memory, and a backend writing into its input must
            # not be able to alter the pristine numpy originals the check compares against
            a = torch.from_numpy(np.array(self.np[key], copy=True, order="C"))
            dtype = torch_dtype(self.case.dtype) if key in FLOAT_KEYS else torch.int32
            self._torch[key] = a.to(device=self.device, dtype=dtype).contiguous()
        return self._torch[key]

    # ------------------------------------------------------------------ jax

    def _jax_on_gpu(self) -> bool:
        if self.device != "cuda":
            return False
        import jax
        return jax.default_backend() in ("gpu", "cuda", "rocm")

    def jax(self, key: str):
        """The input as a JAX array (case dtype / int32). On a GPU shared with torch it is a
        zero-copy DLPack view of ``self.torch(key)``; on CPU it comes from numpy."""
        if key not in self._jax:
            import jax
            import jax.numpy as jnp
            if self._jax_on_gpu() and "torch" in sys.modules:
                # Same GPU buffer as torch's tensor: no device->host->device copy.
                arr = jax.dlpack.from_dlpack(self.torch(key))
            else:
                dtype = jax_dtype(self.case.dtype) if key in FLOAT_KEYS else jnp.int32
                # JAX's own default device, unless the caller pinned the run to the CPU (a
                # torch without CUDA must not drag a GPU-enabled JAX onto the CPU)
                pinned_cpu = self.device == "cpu" and self._device_arg not in (None, "auto")
                where = jax.devices("cpu")[0] if pinned_cpu else None
                # float32 -> dtype is exact: make_inputs already rounded the values.
                arr = jax.device_put(jnp.asarray(self.np[key]).astype(dtype), where)
            self._jax[key] = arr
        return self._jax[key]

    # ------------------------------------------------------------------ checks

    def reset(self) -> None:
        """Forget the framework copies; the next access rebuilds them from ``.np``."""
        self._torch.clear()
        self._jax.clear()

    def changed_inputs(self) -> list[str]:
        """Names of torch inputs whose values no longer equal the generated ones (a backend
        wrote into its inputs). JAX arrays are immutable, but on a GPU they alias torch's
        buffers, so this covers them too."""
        changed = []
        for key, t in self._torch.items():
            if t.numel() > _MUTATION_CHECK_MAX_ELEMS:
                continue
            now = t.detach().float().cpu().numpy() if key in FLOAT_KEYS else t.cpu().numpy()
            if not np.array_equal(now, self.np[key].astype(now.dtype)):
                changed.append(key)
        return changed


__all__ = ["FLOAT_KEYS", "INDEX_KEYS", "Inputs", "gpu_available", "jax_dtype",
           "resolve_device", "torch_dtype"]
