"""OPT adapter: LayerNorm with bias, learned absolute positions added before block 0."""

from __future__ import annotations

from torch import nn

from omniq_lightning.models.base import ModelAdapter, ModelSites, ResidualWriters, tied_embeddings
from omniq_lightning.transforms import BlockSetup, HeadLayout, TransformSite

Q, K, V, O_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"


class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    recipe_family = "opt"
    residual_norm = "layer"
    let_for_weight_only = True  # OmniQuant's released OPT weight-only recipes use LET

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        dec = model.model.decoder
        return [m for m in (dec.embed_tokens, dec.embed_positions, dec.project_in) if m is not None]

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]

    def residual_writers(self, block: nn.Module) -> ResidualWriters:
        return ResidualWriters(linears=("self_attn.out_proj", "fc2"))

    def model_sites(self, model: nn.Module) -> ModelSites:
        dec = model.model.decoder
        extra = tuple(f"model.decoder.{n}" for n in ("project_in", "project_out") if getattr(dec, n) is not None)
        norm = "model.decoder.final_layer_norm" if dec.final_layer_norm is not None else ""
        return ModelSites("model.decoder.embed_tokens", norm, "lm_head", tied_embeddings(model), extra)

    def check_setup(self, model: nn.Module, setup: BlockSetup) -> None:
        if "norm" in setup.scale_locations and not self.blocks(model)[0].do_layer_norm_before:
            raise ValueError("LET needs pre-LayerNorm OPT blocks (do_layer_norm_before=True); this model is post-LN: "
                             "use method.let=false, or a method without transforms (rtn, gptq)")

    def sites(self, block: nn.Module) -> list[TransformSite]:
        """LayerNorm -> q/k/v and -> fc1 with shifts (the LayerNorm bias absorbs them; post-LN blocks have no norm
        there, so only a reorder in place applies); v -> out_proj with a shift (v's bias absorbs it; attention rows
        sum to one, so the shift passes through); q/k per channel (no rotary); fc1 -> fc2 (ReLU commutes with
        positive scales, AWQ's are, and with permutations). RPTQ's released sites are these five."""
        attn = block.self_attn
        heads = HeadLayout(attn.num_heads, attn.num_heads, attn.head_dim)
        pre_ln = block.do_layer_norm_before
        return [
            TransformSite("attn_in", "norm", "self_attn_layer_norm" if pre_ln else None, (Q, K, V), absorbs_shift=True,
                          diagonal_folds=pre_ln),
            TransformSite("vo", "vo", V, (O_PROJ,), absorbs_shift=True, heads=heads),
            TransformSite("qk", "qk", Q, (K,), qk_shape=(attn.k_proj.out_features,), heads=heads),
            TransformSite("mlp_in", "norm", "final_layer_norm" if pre_ln else None, ("fc1",), absorbs_shift=True,
                          diagonal_folds=pre_ln),
            TransformSite("up_down", "up_down", "fc1", ("fc2",), positive=True),
        ]
