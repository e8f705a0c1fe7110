"""OPT adapter: LayerNorm with bias, learned absolute positions added before block 0."""

from __future__ import annotations

import torch
from torch import nn

from omniq_lightning.models.base import InputStats, ModelAdapter
from omniq_lightning.transforms import LETPairSpec, midpoint_shift, smoothquant_scale

Q, K, V, O_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    family = "opt"
    let_for_weight_only = True  # OmniQuant's released OPT weight-only recipes use LET

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

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]

    def let_pair_specs(self, block: nn.Module, stats: InputStats, alpha: float, shift: bool = True) -> list[LETPairSpec]:
        """LayerNorm -> q/k/v and -> fc1 with shifts (the LayerNorm bias absorbs them); v -> out_proj with
        a shift (v's bias absorbs it; attention rows sum to one, so the shift passes through); q/k per channel."""
        if not block.do_layer_norm_before:
            raise ValueError("LET needs pre-LayerNorm OPT blocks (do_layer_norm_before=True); this model is post-LN")
        lo, hi = stats[O_PROJ]
        vo_shift = midpoint_shift(lo, hi) if shift else None
        vo_scale = smoothquant_scale(self.input_absmax(stats, O_PROJ, vo_shift), self.weight_absmax(block, [O_PROJ]), alpha)
        return [
            self.norm_pair(block, "attn_in", "self_attn_layer_norm", [Q, K, V], stats, alpha, use_shift=shift),
            self.norm_pair(block, "mlp_in", "final_layer_norm", ["fc1"], stats, alpha, use_shift=shift),
            LETPairSpec("vo", "linear", V, [O_PROJ], vo_scale, vo_shift),
            LETPairSpec("qk", "qk", Q, [K], torch.ones(block.self_attn.k_proj.out_features,
                                                        device=block.self_attn.k_proj.weight.device)),
        ]
