"""Phi-3 adapter: fused ``qkv_proj`` ([q | k | v] rows) and ``gate_up_proj`` ([gate | up] rows)."""

from __future__ import annotations

from torch import nn

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
