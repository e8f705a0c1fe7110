"""LLaMA family adapter (LLaMA, Mistral, Qwen2): RMSNorm, rotary positions, grouped-query attention."""

from __future__ import annotations

from torch import nn

from omniq_lightning.models.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2")

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.embed_tokens, model.model.rotary_emb]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def post_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.norm, model.lm_head]
