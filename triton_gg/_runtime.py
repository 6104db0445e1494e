"""Where the kernels run: compiled on a CUDA GPU, or through the Triton interpreter on CPU.

Triton decides at decoration time whether a ``@triton.jit`` function (ours and those of
``triton.language`` itself, e.g. ``tl.cumsum``) is compiled or interpreted, so the choice has
to be made before ``triton`` is first imported: on a machine without a CUDA GPU this module
turns the interpreter on (``TRITON_INTERPRET=1``) so that CPU tensors just work.
"""

from __future__ import annotations

import os
import sys

import torch

# Why CPU tensors cannot be interpreted in this process, if they cannot (for the error).
_NO_INTERPRETER = "a GPU is present, so Triton compiles for it"
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    if "triton" in sys.modules:  # too late to switch: decorations already happened
        import warnings
        _NO_INTERPRETER = "triton was imported before triton_gg, too late to switch it on"
        warnings.warn("triton was imported before triton_gg on a machine without a GPU; set "
                      "TRITON_INTERPRET=1 before importing triton to run triton_gg on CPU")
    else:
        os.environ["TRITON_INTERPRET"] = "1"

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_interpreter_for_numpy_2_5() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array)`` on a
    one-element 1-D array (used by ``range(0, K, BLOCK)`` over a runtime K), which NumPy 2.5
    refuses. Re-define that one conversion, through ``.item()``, after Triton's own patching."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_gg_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._gg_patched = True
    interpreter._patch_lang_tensor = patched


if INTERPRETING:
    _patch_interpreter_for_numpy_2_5()


def check_device(tensor: torch.Tensor, name: str) -> None:
    """Refuse a device the kernels cannot run on in this process."""
    if tensor.device.type == "cuda":
        if INTERPRETING:
            raise ValueError(f"{name} is on {tensor.device} but the Triton interpreter is on "
                             f"(TRITON_INTERPRET=1); unset it to run compiled kernels")
        return
    if tensor.device.type == "cpu":
        if not INTERPRETING:
            raise ValueError(f"{name} is on CPU, but the Triton interpreter is off "
                             f"({_NO_INTERPRETER}); move the tensors to CUDA, or set "
                             f"TRITON_INTERPRET=1 before importing triton to interpret on CPU")
        return
    raise ValueError(f"{name} is on {tensor.device}; triton_gg runs on CUDA or (interpreted) "
                     f"CPU tensors")
