"""OPT adapter: LayerNorm with bias, learned absolute positions added before block 0."""

from __future__ import annotations

from torch import nn

from omniq_lightning.models.base import ModelAdapter


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        dec = model.model.decoder
        return [m for m in (dec.embed_tokens, dec.embed_positions, dec.project_in) if m is not None]

    def final_norm(self, model: nn.Module) -> nn.Module:
        dec = model.model.decoder
        return dec.final_layer_norm if dec.final_layer_norm is not None else nn.Identity()

    def post_block_modules(self, model: nn.Module) -> list[nn.Module]:
        dec = model.model.decoder
        return [m for m in (dec.final_layer_norm, dec.project_out, model.lm_head) if m is not None]
