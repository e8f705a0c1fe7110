"""OPT adapter: LayerNorm with bias, learned absolute positions added before block 0."""

from __future__ import annotations

from torch import nn

from omniq_lightning.models.base import ModelAdapter
from omniq_lightning.transforms import BlockPlan, PairDecl

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

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]

    def check_plan(self, model: nn.Module, plan: BlockPlan) -> None:
        if "norm" in plan.let_roles and not self.blocks(model)[0].do_layer_norm_before:
            raise ValueError("LET needs pre-LayerNorm OPT blocks (do_layer_norm_before=True); this model is post-LN: "
                             "use method.let=false, or a method without transforms (rtn, gptq)")

    def pairs(self, block: nn.Module) -> list[PairDecl]:
        """LayerNorm -> q/k/v and -> fc1 with shifts (the LayerNorm bias absorbs them); v -> out_proj with a
        shift (v's bias absorbs it; attention rows sum to one, so the shift passes through); q/k per channel
        (no rotary); fc1 -> fc2 (ReLU commutes with positive scales: AWQ's are)."""
        decls = [
            PairDecl("vo", "vo", V, (O_PROJ,), absorbs_shift=True),
            PairDecl("qk", "qk", Q, (K,), qk_shape=(block.self_attn.k_proj.out_features,)),
            PairDecl("up_down", "up_down", "fc1", ("fc2",), positive=True),
        ]
        if block.do_layer_norm_before:
            decls = [PairDecl("attn_in", "norm", "self_attn_layer_norm", (Q, K, V), absorbs_shift=True),
                     PairDecl("mlp_in", "norm", "final_layer_norm", ("fc1",), absorbs_shift=True), *decls]
        return decls
