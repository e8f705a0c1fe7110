"""Quantization numerics: specs and weight formats, uniform and power grids, LWC, learned rounding,
straight-through estimators, integer codes."""

from omniq_lightning.quant.functional import (
    RANGES,
    RoundSTE,
    fake_quant,
    fake_quant_per_tensor,
    grid,
    lwc_bounds,
    round_ste,
    scale_zero,
    tensor_range_params,
    truncate_ste,
    validate_weight,
)
from omniq_lightning.quant.ops import fake_quant_per_token, fake_quant_weight
from omniq_lightning.quant.spec import GRIDS, QuantSpec, WeightFormat
from omniq_lightning.quant.weight import GroupGrid, QuantizedWeight, grid_of, quantize_weight

__all__ = [
    "GRIDS",
    "RANGES",
    "GroupGrid",
    "QuantSpec",
    "QuantizedWeight",
    "RoundSTE",
    "WeightFormat",
    "fake_quant",
    "fake_quant_per_tensor",
    "fake_quant_per_token",
    "fake_quant_weight",
    "grid",
    "grid_of",
    "lwc_bounds",
    "quantize_weight",
    "round_ste",
    "scale_zero",
    "tensor_range_params",
    "truncate_ste",
    "validate_weight",
]
