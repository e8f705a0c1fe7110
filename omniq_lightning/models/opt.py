"""OPT adapter: LayerNorm with bias, learned absolute positions added before block 0."""

from __future__ import annotations

from torch import nn

from omniq_lightning.models.base import ModelAdapter
from omniq_lightning.transforms import BlockPlan, PairDecl, ReorderDecl

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

    def reorder_sites(self, block: nn.Module) -> list[ReorderDecl]:
        """RPTQ's released sites (OPT): R1 q/k/v input, R2 q/k per head, R3 v rows and out_proj columns per head,
        R4 fc1 input, R5 fc1 rows and fc2 columns (ReLU is elementwise)."""
        attn = block.self_attn
        head_dim = attn.head_dim
        per_head = dict(clusters=4, n_kv=attn.num_heads, rep=1, head_dim=head_dim)
        return [
            ReorderDecl("R1", "inputs", stats=Q, targets=(Q, K, V)),
            ReorderDecl("R2", "qk", stats="qk", **per_head),
            ReorderDecl("R3", "rows", stats="v", sources=(V,), targets=(O_PROJ,), **per_head),
            ReorderDecl("R4", "inputs", stats="fc1", targets=("fc1",)),
            ReorderDecl("R5", "rows", stats="fc2", sources=("fc1",), targets=("fc2",)),
        ]

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
