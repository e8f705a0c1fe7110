"""`QuantMatMul`: quantizes the inputs of the attention matmuls (Q, K for QK^T; V for PV).

Quantizing K and V per token (over each head's channels) is exactly what a quantized KV cache does.
It plugs into Hugging Face attention through the registered attention function ``omniq_quant``: an
attention module whose own config names it calls this module, which quantizes and then runs the
original attention function (eager or sdpa) unchanged.

``input_transform``: one slot for a transform of (query, key, value) as they arrive, after the rotary embedding
and before quantization (e.g. an online rotation of q and k, which leaves every q.k product unchanged).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from omniq_lightning.nn.act import ActQuantizer

ATTENTION_NAME = "omniq_quant"


class QuantMatMul(nn.Module):
    def __init__(self, q_bits: int, kv_bits: int, symmetric: bool, base_attention: Callable) -> None:
        super().__init__()
        self.q_quant = ActQuantizer(q_bits, "token", symmetric)
        self.k_quant = ActQuantizer(kv_bits, "token", symmetric)
        self.v_quant = ActQuantizer(kv_bits, "token", symmetric)
        self.base_attention = base_attention
        self.input_transform: nn.Module | None = None  # (query, key, value) -> (query, key, value)

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        if self.input_transform is not None:
            query, key, value = self.input_transform(query, key, value)
        return self.base_attention(
            module, self.q_quant(query), self.k_quant(key), self.v_quant(value), attention_mask, **kwargs
        )


def quantized_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask, **kwargs):
    return module.omniq_matmul(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, quantized_attention)
    return ATTENTION_NAME
