"""LLaMA family adapter (LLaMA, Mistral, Qwen2, Qwen3): RMSNorm, rotary positions, grouped-query attention."""

from __future__ import annotations

from torch import nn

from omniq_lightning.models.base import ModelAdapter
from omniq_lightning.models.heads import heads_of
from omniq_lightning.transforms import PairDecl, ReorderDecl

Q, K, V, O_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"


def attention_pairs(block: nn.Module, norm: str) -> list[PairDecl]:
    """norm -> q/k/v; v -> o with one factor per value channel shared by its query heads (exact under GQA);
    q/k with one factor per rotary pair of each key head (RoPE commutes with it, QK^T is unchanged) unless
    the family normalises q and k per head after the projection (Qwen3, Gemma-3: q_norm / k_norm undo any
    scale on q, so no q/k pair is exact there)."""
    heads = heads_of(block.self_attn)
    decls = [
        PairDecl("attn_in", "norm", norm, (Q, K, V)),
        PairDecl("vo", "vo", V, (O_PROJ,), expand_target=heads.to_query_heads, reduce=heads.per_kv_head),
    ]
    if not hasattr(block.self_attn, "q_norm"):
        decls.append(PairDecl("qk", "qk", Q, (K,), expand_source=heads.rotary_q, expand_target=heads.rotary_k,
                              qk_shape=heads.qk_shape))
    return decls


def gated_mlp_pairs(norm: str, prefix: str = "mlp.") -> list[PairDecl]:
    """norm -> gate/up, and up -> down: ``down(act(gate) * up)`` is linear in up, so up's rows may carry any
    non-zero factor that down's columns take back."""
    gate, up, down = f"{prefix}gate_proj", f"{prefix}up_proj", f"{prefix}down_proj"
    return [PairDecl("mlp_in", "norm", norm, (gate, up)), PairDecl("up_down", "up_down", up, (down,))]


def reorder_sites(block: nn.Module, q: str, k: str, v: str, o: str, fc_in: tuple[str, ...], fc_out: str) -> list[ReorderDecl]:
    """RPTQ's five sites: R1 the q/k/v input, R2 post-rotary q/k per key head, R3 v rows and o columns per
    value head, R4 the MLP input, R5 the down (fc2) input with the rows of the linears that produce it.
    The released defaults: 32 clusters for R1, R4 and R5, 4 per head for R2 and R3."""
    heads = heads_of(block.self_attn)
    per_head = dict(clusters=4, n_kv=heads.n_kv, rep=heads.rep, head_dim=heads.head_dim)
    return [
        ReorderDecl("R1", "inputs", stats=q, targets=(q, k, v)),
        ReorderDecl("R2", "qk", stats="qk", **per_head),
        ReorderDecl("R3", "rows", stats="v", sources=(v,), targets=(o,), **per_head),
        ReorderDecl("R4", "inputs", stats=fc_in[0], targets=fc_in),
        ReorderDecl("R5", "rows", stats=fc_out, sources=fc_in, targets=(fc_out,)),
    ]


class DecoderLayersAdapter(ModelAdapter):
    """The layout LLaMA-style families share in transformers: ``model.model.layers``, embeddings and rotary
    embeddings before the blocks, attention in ``self_attn``."""

    family = "llama"
    let_for_weight_only = False  # OmniQuant's released LLaMA weight-only recipes use LWC alone

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.embed_tokens, model.model.rotary_emb]

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        return [block.self_attn]


class LlamaAdapter(DecoderLayersAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def pairs(self, block: nn.Module) -> list[PairDecl]:
        """RMSNorm -> q/k/v and -> gate/up (no shifts: RMSNorm has no bias to absorb them), v -> o, q/k, up -> down."""
        return attention_pairs(block, "input_layernorm") + gated_mlp_pairs("post_attention_layernorm")

    def reorder_sites(self, block: nn.Module) -> list[ReorderDecl]:
        return reorder_sites(block, Q, K, V, O_PROJ, (GATE, UP), DOWN)
