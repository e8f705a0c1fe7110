"""Phi-3 adapter: fused ``qkv_proj`` ([q | k | v] rows) and ``gate_up_proj`` ([gate | up] rows)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from omniq_lightning.models.base import GGUFLayout
from omniq_lightning.models.heads import heads_of
from omniq_lightning.models.llama import DecoderLayersAdapter
from omniq_lightning.transforms import TransformSite

QKV, O_PROJ, GATE_UP, DOWN = "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"


class Phi3Adapter(DecoderLayersAdapter):
    """Sites on fused linears: input_layernorm -> qkv_proj; v rows of qkv_proj -> o_proj (GQA-aware);
    post_attention_layernorm -> gate_up_proj; up rows of gate_up_proj -> down_proj. No q/k site (q and k
    share the fused projection and partial rotary leaves some channels unrotated: not declared)."""

    model_types = ("phi3",)

    def sites(self, block: nn.Module) -> list[TransformSite]:
        heads = heads_of(block.self_attn)
        q, kv = heads.n_heads * heads.head_dim, heads.n_kv * heads.head_dim
        inter = block.mlp.down_proj.in_features
        return [
            TransformSite("attn_in", "norm", "input_layernorm", (QKV,)),
            TransformSite("vo", "vo", QKV, (O_PROJ,), source_rows=(q + kv, q + 2 * kv),
                          expand_target=heads.to_query_heads, reduce=heads.per_kv_head, heads=heads),
            TransformSite("mlp_in", "norm", "post_attention_layernorm", (GATE_UP,)),
            TransformSite("up_down", "up_down", GATE_UP, (DOWN,), source_rows=(inter, 2 * inter)),
        ]

    gguf_archs = {"phi3": "phi3"}

    def gguf_layout(self, config: dict) -> GGUFLayout | None:
        """llama.cpp's ``phi3``: the fused projections as they are; partial rotary as a rotary width; the context
        the rotary factors were trained for."""
        layout = super().gguf_layout(config)
        if layout is None:
            return None
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        partial = layout.rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
        hparams = {"rope_dimension_count": int(partial * hidden) // heads,
                   "sliding_window": int(config.get("sliding_window") or 0)}  # llama.cpp runs Phi-3 without it
        original = layout.rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        if original:
            hparams["rope_scaling_orig_ctx_len"] = int(original)
        return replace(layout, hparams=hparams)
