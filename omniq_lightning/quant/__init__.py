"""Quantization numerics: specs, uniform fake quantizers, LWC, straight-through estimators."""

from omniq_lightning.quant.functional import (
    RoundSTE,
    fake_quant,
    fake_quant_per_tensor,
    grid,
    lwc_bounds,
    quantize_weight_int,
    round_ste,
    scale_zero,
    tensor_range_params,
    validate_weight,
    weight_scale_zero,
)
from omniq_lightning.quant.ops import fake_quant_per_token, fake_quant_weight
from omniq_lightning.quant.spec import QuantSpec

__all__ = [
    "QuantSpec",
    "RoundSTE",
    "fake_quant",
    "fake_quant_per_tensor",
    "fake_quant_per_token",
    "fake_quant_weight",
    "grid",
    "lwc_bounds",
    "quantize_weight_int",
    "round_ste",
    "scale_zero",
    "tensor_range_params",
    "validate_weight",
    "weight_scale_zero",
]
