"""Quantized building blocks: `QuantLinear`, `QuantMatMul`, `ActQuantizer`."""

from omniq_lightning.nn.act import ActQuantizer
from omniq_lightning.nn.linear import QuantLinear, swap_linears
from omniq_lightning.nn.matmul import ATTENTION_NAME, QuantMatMul, register_attention

__all__ = ["ATTENTION_NAME", "ActQuantizer", "QuantLinear", "QuantMatMul", "register_attention", "swap_linears"]
