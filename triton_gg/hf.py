"""triton_gg as an experts implementation of Hugging Face transformers (>= 5).

    import triton_gg
    name = triton_gg.register_hf_experts()              # "triton_gg"
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=name)

transformers' experts classes (``@use_experts_implementation``: Qwen2/3-MoE, Mixtral, OLMoE,
DeepSeek-V3, gpt-oss and the others that share the layout) look their forward up by name in
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``; ``register_hf_experts`` adds
``hf_experts_forward`` there. It reads the module's own layout flags and options, as the
library's ``grouped_mm`` implementation does:

* ``has_gate``: ``gate_up_proj`` [E, 2I, H] and the module's ``_apply_gate`` (its own
  activation, clamps, interleaving) on the first GEMM's rows; else ``up_proj`` [E, I, H] and
  ``act_fn``.
* ``is_transposed``: weights stored [E, in, out]; passed to the kernels as transposed views
  (no copy).
* ``has_bias``: ``*_proj_bias`` [E, out] added per expert (the second one weighted by the
  routing weight, as the eager loop does).
* expert ids outside [0, E) (expert-parallel sentinels) contribute nothing.

What the kernels cannot run raises ``NotImplementedError`` naming it (weights that are not
bf16/fp16/fp32 tensors, e.g. quantised experts, transformers' FP8 experts included, which
look the name up in a registry of their own; a layout attribute this module does not know).
A gate set on one module instance (``module._apply_gate = ...``) is honoured like a class's.
"""

from __future__ import annotations

import torch

from triton_gg.moe import expert_block

NAME = "triton_gg"
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _unsupported(module, what: str):
    raise NotImplementedError(
        f"experts_implementation='{NAME}' cannot run {type(module).__name__}: {what}")


def _weight(module, name: str) -> torch.Tensor:
    w = getattr(module, name, None)
    if not isinstance(w, torch.Tensor):
        _unsupported(module, f"it has no tensor '{name}' (expected the Hugging Face experts "
                             f"layout)")
    if w.dtype not in _FLOAT or w.ndim != 3:
        _unsupported(module, f"'{name}' is {w.dtype} {tuple(w.shape)}; the kernels take 3-D "
                             f"float32/float16/bfloat16 expert weights (quantised experts "
                             f"are not supported)")
    # the kernels take nn.Linear's [E, out, in]; a transposed store is read through a view
    return w.transpose(1, 2) if getattr(module, "is_transposed", False) else w


def _bias(module, name: str) -> torch.Tensor | None:
    if not getattr(module, "has_bias", False):
        return None
    b = getattr(module, name, None)
    if not isinstance(b, torch.Tensor):
        _unsupported(module, f"has_bias is set but it has no tensor '{name}'")
    return b


def _is_default_silu_gate(module) -> bool:
    """act_fn(gate) * up on concatenated [gate | up] rows with act_fn SiLU: transformers'
    default ``_apply_gate``, not overridden by the model."""
    try:
        from transformers.activations import SiLUActivation
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    if "_apply_gate" in vars(module):  # a gate set on this instance overrides the class's
        return False
    gate = getattr(type(module), "_apply_gate", None)
    return (gate is _default_apply_gate and getattr(module, "is_concatenated", True)
            and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)))


def hf_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """The forward of a transformers experts module on triton_gg's kernels.

    hidden_states [T, H]; top_k_index [T, k]; top_k_weights [T, k] -> [T, H] in
    hidden_states' dtype. The GEMMs run in the weights' dtype (as transformers' grouped_mm
    does) with fp32 accumulation.
    """
    has_gate = getattr(self, "has_gate", True)
    if has_gate:
        w1, b1 = _weight(self, "gate_up_proj"), _bias(self, "gate_up_proj_bias")
        # None: the kernels' own SiLU-gate (fused into the first GEMM), exactly what the
        # module's default gate computes; any other gate runs as the module defines it
        mid = None if _is_default_silu_gate(self) else self._apply_gate
    else:
        w1, b1 = _weight(self, "up_proj"), _bias(self, "up_proj_bias")
        mid = self.act_fn
    w2, b2 = _weight(self, "down_proj"), _bias(self, "down_proj_bias")
    return expert_block(hidden_states, w1, w2, top_k_index, top_k_weights, mid, b1=b1, b2=b2,
                        names=("gate_up_proj" if has_gate else "up_proj", "down_proj"))


def register_hf_experts(name: str = NAME) -> str:
    """Register ``hf_experts_forward`` in transformers' experts interface under ``name``
    and return the name, for ``from_pretrained(..., experts_implementation=name)`` or
    ``model.set_experts_implementation(name)``. Idempotent."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:  # transformers < 5 has no experts interface
        raise ImportError("register_hf_experts needs transformers >= 5 "
                          "(transformers.integrations.moe.ExpertsInterface)") from e
    ExpertsInterface.register(name, hf_experts_forward)
    _register_quantised_refusal(name)
    return name


def _refuse_quantised(self, hidden_states, top_k_index, top_k_weights):
    _unsupported(self, "its experts are FP8-quantised (transformers' FP8 experts); the "
                       "kernels take float32/float16/bfloat16 weights")


def _register_quantised_refusal(name: str) -> None:
    """transformers' FP8 experts look their forward up in a registry of their own: the name
    goes there too, so that such a model says what is unsupported instead of that the name
    is unknown."""
    try:
        from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    except ImportError:  # a transformers without FP8 experts
        return
    FP8ExpertsInterface.register(name, _refuse_quantised)
