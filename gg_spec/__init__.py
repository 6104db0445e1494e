"""gg_spec: the framework-neutral spec of the MoE grouped GEMMs (numpy only).

Shapes and routing contract, kernel configs and their validity rules, model presets, the
float64 reference and the per-dtype tolerances; ``triton_gg`` and ``pallas_gg`` both read
from here so that a rule lives in one place.
"""

from gg_spec import checks, reference
from gg_spec.checks import ArgInfo, Dims, set_value_checks, value_checks, value_checks_enabled
from gg_spec.configs import (SHARED_MEMORY_LIMIT, AnyConfig, DWConfig, DXConfig, ForwardConfig,
                             config_from_dict, config_to_dict, default_config, fits,
                             search_space, shared_memory_bytes, token_bucket, tuning_key,
                             valid_candidates, validate)
from gg_spec.presets import (ANCHOR_SHAPES, PRESETS, REAL_PRESETS, TINY_PRESETS, GemmShape,
                             ModelPreset, get_preset, get_shape)
from gg_spec.routing import (ROUTING_KINDS, Routing, expert_of_position, expert_offsets,
                             make_routing, make_topk_ids, route)
from gg_spec.tolerances import TOLERANCES, max_abs_error, rel_error, tolerance

__all__ = [
    "ANCHOR_SHAPES", "AnyConfig", "ArgInfo", "DWConfig", "DXConfig", "Dims", "ForwardConfig",
    "GemmShape", "ModelPreset", "PRESETS", "REAL_PRESETS", "ROUTING_KINDS", "Routing",
    "TINY_PRESETS", "TOLERANCES", "checks", "config_from_dict", "config_to_dict",
    "SHARED_MEMORY_LIMIT", "default_config", "expert_of_position", "expert_offsets", "fits",
    "get_preset", "get_shape", "make_routing", "make_topk_ids", "max_abs_error", "reference",
    "rel_error", "route", "search_space", "set_value_checks", "shared_memory_bytes",
    "token_bucket", "tolerance", "tuning_key",
    "valid_candidates", "validate", "value_checks", "value_checks_enabled",
]
