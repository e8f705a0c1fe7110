"""Gemma-2 and Gemma-3 adapter: RMSNorm as ``x * (1 + w)``, sandwich norms, alternating sliding-window and
global attention (each block replays with its own mask and, on Gemma-3, its own rotary embedding)."""

from __future__ import annotations

from torch import nn

from omniq_lightning.models.base import ModelAdapter, ModelSites, ResidualWriters, tied_embeddings
from omniq_lightning.models.llama import attention_sites, gated_mlp_sites
from omniq_lightning.transforms import TransformSite


class GemmaAdapter(ModelAdapter):
    """Sites: input_layernorm -> q/k/v, v -> o, q/k (a diagonal folds on Gemma-2 only: Gemma-3's q_norm / k_norm
    undo a q/k scale), pre_feedforward_layernorm -> gate/up, up -> down. The post-attention and post-feedforward norms act on the
    projections' outputs before the residual add: no exact pair there. Folding a scale into a Gemma norm
    divides ``1 + w``, not ``w``."""

    model_types = ("gemma3_text", "gemma3")
    recipe_family = "llama"  # RMSNorm + rotary + gated MLP: the LLaMA recipes apply
    norm_offset = 1.0

    def text_model_name(self, model: nn.Module) -> str:
        return "model.language_model" if hasattr(model.model, "language_model") else "model"  # multimodal Gemma-3

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.text_model_name(model))

    def residual_writers(self, block: nn.Module) -> ResidualWriters:
        """The sandwich norms sit between o_proj / down_proj and the residual stream: rotated online."""
        return ResidualWriters(norms=("post_attention_layernorm", "post_feedforward_layernorm"))

    def model_sites(self, model: nn.Module) -> ModelSites:
        text = self.text_model_name(model)
        return ModelSites(f"{text}.embed_tokens", f"{text}.norm", "lm_head", tied_embeddings(model))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.text_model(model).layers

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        text = self.text_model(model)
        return [text.embed_tokens, text.rotary_emb]

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]

    def sites(self, block: nn.Module) -> list[TransformSite]:
        return attention_sites(block, "input_layernorm") + gated_mlp_sites("pre_feedforward_layernorm")


class Gemma2Adapter(GemmaAdapter):
    model_types = ("gemma2",)
    # Gemma-2 soft-caps its attention logits: transformers refuses sdpa for it (5.24) or silently drops the cap (5.17)
    required_attn_implementation = "eager"
