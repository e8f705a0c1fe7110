"""The head layout of an attention module (grouped-query attention, head width), as transformers configures it."""

from __future__ import annotations

from omniq_lightning.transforms import HeadLayout


def heads_of(attn) -> HeadLayout:
    cfg = attn.config
    return HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim)
