"""Equivalence transforms (LET scale/shift pairs and their folding) and the quantized block."""

from omniq_lightning.transforms.block import QuantBlock
from omniq_lightning.transforms.let import (
    LETNorm,
    LETPair,
    LETPairSpec,
    midpoint_shift,
    scale_input_columns,
    scale_output_rows,
    smoothquant_scale,
)

__all__ = [
    "LETNorm",
    "LETPair",
    "LETPairSpec",
    "QuantBlock",
    "midpoint_shift",
    "scale_input_columns",
    "scale_output_rows",
    "smoothquant_scale",
]
