"""LLaMA family adapter (LLaMA, Mistral, Qwen2): RMSNorm, rotary positions, grouped-query attention."""

from __future__ import annotations

import torch
from torch import nn

from omniq_lightning.models.base import InputStats, ModelAdapter
from omniq_lightning.transforms import LETPairSpec, smoothquant_scale

Q, K, V, O_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP = "mlp.gate_proj", "mlp.up_proj"


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2")
    family = "llama"
    let_for_weight_only = False  # OmniQuant's released LLaMA weight-only recipes use LWC alone

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.embed_tokens, model.model.rotary_emb]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def post_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.norm, model.lm_head]

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]

    def let_pair_specs(self, block: nn.Module, stats: InputStats, alpha: float, shift: bool = True) -> list[LETPairSpec]:
        """RMSNorm -> q/k/v and -> gate/up (no shifts: RMSNorm has no bias to absorb them); v -> o with
        one scale per value channel shared by the query heads of its group; q/k with one scale per
        rotary pair of each key head, so the rotation commutes with it and QK^T stays exact."""
        cfg = block.self_attn.config
        n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = block.self_attn.head_dim
        rep = n_heads // n_kv

        def per_kv_head(t: torch.Tensor) -> torch.Tensor:  # [n_heads*hd] -> [n_kv*hd], max over each group
            return t.view(n_kv, rep, head_dim).amax(1).reshape(-1)

        def to_query_heads(t: torch.Tensor) -> torch.Tensor:  # [n_kv*hd] -> [n_heads*hd]
            return t.view(n_kv, 1, head_dim).expand(n_kv, rep, head_dim).reshape(-1)

        def rotary_k(p: torch.Tensor) -> torch.Tensor:  # [n_kv, hd/2] -> [n_kv*hd]: same scale on (i, i+hd/2)
            return torch.cat([p, p], dim=-1).reshape(-1)

        def rotary_q(p: torch.Tensor) -> torch.Tensor:
            return to_query_heads(rotary_k(p))

        vo_scale = smoothquant_scale(
            per_kv_head(self.input_absmax(stats, O_PROJ)), per_kv_head(self.weight_absmax(block, [O_PROJ])), alpha
        )
        return [
            self.norm_pair(block, "attn_in", "input_layernorm", [Q, K, V], stats, alpha, use_shift=False),
            self.norm_pair(block, "mlp_in", "post_attention_layernorm", [GATE, UP], stats, alpha, use_shift=False),
            LETPairSpec("vo", "linear", V, [O_PROJ], vo_scale, expand_target=to_query_heads),
            LETPairSpec("qk", "qk", Q, [K], torch.ones(n_kv, head_dim // 2, device=block.self_attn.q_proj.weight.device),
                        expand_source=rotary_q, expand_target=rotary_k),
        ]
