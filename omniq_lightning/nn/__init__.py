"""Quantized building blocks: `QuantLinear`, `WeightQuantizer`, `QuantMatMul`, `ActQuantizer`."""

from omniq_lightning.nn.act import ActQuantizer, ClusterActQuantizer
from omniq_lightning.nn.linear import OnlineInputLinear, QuantLinear, swap_linears
from omniq_lightning.nn.matmul import ATTENTION_NAME, QuantMatMul, register_attention
from omniq_lightning.nn.router import LETRouter
from omniq_lightning.nn.weight import NO_CLIP_LOGIT, WeightQuantizer, clip_logit

__all__ = ["ATTENTION_NAME", "NO_CLIP_LOGIT", "ActQuantizer", "ClusterActQuantizer", "LETRouter", "OnlineInputLinear", "QuantLinear", "QuantMatMul", "WeightQuantizer",
           "clip_logit", "register_attention", "swap_linears"]
