"""Equivalence transforms (LET scale/shift pairs, their declarations and exact folding) and the quantized block."""

from omniq_lightning.transforms.block import BlockPlan, QuantBlock
from omniq_lightning.transforms.let import (
    ROLES,
    InputStats,
    LETNorm,
    LETPair,
    LETPairSpec,
    PairDecl,
    initial_pair,
    midpoint_shift,
    scale_input_columns,
    scale_output_rows,
    smoothquant_scale,
)
from omniq_lightning.transforms.reorder import ReorderDecl

__all__ = [
    "ROLES",
    "BlockPlan",
    "InputStats",
    "LETNorm",
    "LETPair",
    "LETPairSpec",
    "PairDecl",
    "QuantBlock",
    "ReorderDecl",
    "initial_pair",
    "midpoint_shift",
    "scale_input_columns",
    "scale_output_rows",
    "smoothquant_scale",
]
