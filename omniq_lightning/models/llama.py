"""LLaMA family adapter (LLaMA, Mistral, Qwen2, Qwen3): RMSNorm, rotary positions, grouped-query attention."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from omniq_lightning.models.base import GGUFLayout, ModelAdapter, ModelSites, ResidualWriters, tied_embeddings
from omniq_lightning.models.heads import heads_of
from omniq_lightning.transforms import TransformSite

Q, K, V, O_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"


def attention_sites(block: nn.Module, norm: str) -> list[TransformSite]:
    """norm -> q/k/v; v -> o with one diagonal factor per value channel shared by its query heads (exact under
    GQA); q/k with one factor per rotary pair of each key head (RoPE commutes with it, QK^T is unchanged), which
    does not fold where the family normalises q and k per head after the projection (Qwen3, Gemma-3: q_norm /
    k_norm undo any scale on q)."""
    heads = heads_of(block.self_attn)
    return [
        TransformSite("attn_in", "norm", norm, (Q, K, V)),
        TransformSite("vo", "vo", V, (O_PROJ,), expand_target=heads.to_query_heads, reduce=heads.per_kv_head,
                      heads=heads),
        TransformSite("qk", "qk", Q, (K,), expand_source=heads.rotary_q, expand_target=heads.rotary_k,
                      qk_shape=heads.qk_shape, heads=heads, diagonal_folds=not hasattr(block.self_attn, "q_norm")),
    ]


def gated_mlp_sites(norm: str, prefix: str = "mlp.", name: str = "up_down") -> list[TransformSite]:
    """norm -> gate/up, and up -> down: ``down(act(gate) * up)`` is linear in up, so up's rows may carry any
    non-zero factor that down's columns take back; a permutation moves gate's and up's rows together."""
    gate, up, down = f"{prefix}gate_proj", f"{prefix}up_proj", f"{prefix}down_proj"
    return [TransformSite("mlp_in", "norm", norm, (gate, up)),
            TransformSite(name, "up_down", up, (down,), producers=(gate, up))]


class DecoderLayersAdapter(ModelAdapter):
    """The layout LLaMA-style families share in transformers: ``model.model.layers``, embeddings and rotary
    embeddings before the blocks, attention in ``self_attn``."""

    recipe_family = "llama"
    let_for_weight_only = False  # OmniQuant's released LLaMA weight-only recipes use LWC alone

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.embed_tokens, model.model.rotary_emb]

    def residual_writers(self, block: nn.Module) -> ResidualWriters:
        return ResidualWriters(linears=("self_attn.o_proj", "mlp.down_proj"))

    def model_sites(self, model: nn.Module) -> ModelSites:
        return ModelSites("model.embed_tokens", "model.norm", "lm_head", tied_embeddings(model))

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]


class LlamaAdapter(DecoderLayersAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def sites(self, block: nn.Module) -> list[TransformSite]:
        """RMSNorm -> q/k/v and -> gate/up (no shifts: RMSNorm has no bias to absorb them), v -> o, q/k, up -> down."""
        return attention_sites(block, "input_layernorm") + gated_mlp_sites("post_attention_layernorm")

    gguf_archs = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

    def gguf_layout(self, config: dict) -> GGUFLayout | None:
        """LLaMA and Mistral are llama.cpp's ``llama`` (query/key rows interleaved per head); Qwen2/3 their own."""
        layout = super().gguf_layout(config)
        if layout is None or layout.arch != "llama":
            return layout
        heads = config["num_attention_heads"]
        return replace(layout, permuted_rows={"self_attn.q_proj": heads,
                                              "self_attn.k_proj": config.get("num_key_value_heads") or heads})
