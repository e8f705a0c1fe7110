"""Transform sites and the transforms on them (LET's diagonal scales and shifts, RPTQ's reorders, their exact
folding) and the quantized block."""

from omniq_lightning.transforms.block import BlockSetup, OnlineRotations, QuantBlock
from omniq_lightning.transforms.let import (
    InputStats,
    LETNorm,
    LETPair,
    LETPairSpec,
    initial_pair,
    midpoint_shift,
    scale_input_columns,
    scale_output_rows,
    smoothquant_scale,
)
from omniq_lightning.transforms.sites import LOCATIONS, HeadLayout, TransformSite

__all__ = [
    "LOCATIONS",
    "BlockSetup",
    "HeadLayout",
    "InputStats",
    "LETNorm",
    "LETPair",
    "LETPairSpec",
    "OnlineRotations",
    "QuantBlock",
    "TransformSite",
    "initial_pair",
    "midpoint_shift",
    "scale_input_columns",
    "scale_output_rows",
    "smoothquant_scale",
]
