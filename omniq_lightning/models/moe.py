"""Mixture-of-experts adapter (Mixtral, Qwen2-MoE, Qwen3-MoE).

transformers keeps each block's experts as two fused 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) behind a grouped-matmul kernel, and the router as a raw weight. For calibration a
block is *prepared*: the experts become one MLP of plain linears per expert (computing exactly what the
model's eager expert loop computes), so every expert's gate, up and down projections are quantized like
any linear, and each sees only the tokens routed to it (its Hessian, AWQ statistics and training signal
come from those tokens alone). The router stays in full precision; it reads the same norm output as the
experts, so it is a target of that norm's transform (its weight columns take the scale). A weight-only
block is fused back afterwards, so the exported checkpoint has the model's own layout.

An expert that receives no calibration token keeps its initial quantization grid: no up -> down transform
is initialised for it, AWQ leaves it unscaled and unclipped, GPTQ falls back to round-to-nearest on its
grid (there is no Hessian to solve with), and training leaves its parameters where they started.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from omniq_lightning.models.base import ResidualWriters
from omniq_lightning.models.llama import LlamaAdapter, attention_sites, gated_mlp_sites
from omniq_lightning.nn import LETRouter
from omniq_lightning.transforms import TransformSite

NORM = "post_attention_layernorm"


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """The experts of one sparse block, one :class:`ExpertMLP` each; called like transformers' experts module
    (``hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> [T, H]``), with its eager loop's arithmetic."""

    def __init__(self, fused: nn.Module) -> None:
        e, two_i, h = fused.gate_up_proj.shape
        inter = two_i // 2
        w_gu, w_d = fused.gate_up_proj.detach(), fused.down_proj.detach()
        mlps = []
        for i in range(e):
            lins = [nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False), nn.Linear(inter, h, bias=False)]
            for lin, w in zip(lins, (w_gu[i, :inter], w_gu[i, inter:], w_d[i]), strict=True):
                lin.weight = nn.Parameter(w.clone(), requires_grad=False)
            mlps.append(ExpertMLP(*lins, fused.act_fn))
        super().__init__(mlps)
        self.fused_class, self.fused_config = type(fused), fused.config

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            y = expert(hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def fusable(self) -> bool:
        """Whether the fused module can run this block: plain linears (no input quantizers left)."""
        return all(type(m) is nn.Linear for mlp in self for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The model's own fused experts module holding these (quantized, folded) weights."""
        fused = self.fused_class(self.fused_config)
        w = self[0].gate_proj.weight
        fused.to(device=w.device, dtype=w.dtype)
        for i, mlp in enumerate(self):
            fused.gate_up_proj[i].copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            fused.down_proj[i].copy_(mlp.down_proj.weight)
        return fused


def _is_sparse(mlp: nn.Module) -> bool:
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


class MoEAdapter(LlamaAdapter):
    """Attention as in the LLaMA family (q/k pair only without per-head q/k norms: Mixtral and Qwen2-MoE yes,
    Qwen3-MoE no). Sparse MLP: one norm pair over the router, every expert's gate/up and the shared expert's
    gate/up and gate; up -> down per expert (and for the shared expert). Dense layers (Qwen2-MoE's
    ``mlp_only_layers``) pair like LLaMA."""

    model_types = ("mixtral", "qwen2_moe", "qwen3_moe")
    experts = True
    fused_experts = True

    gguf_archs: dict[str, str] = {}  # none yet: llama.cpp stacks a layer's experts (ffn_gate_exps, ...), not written

    def prepare_block(self, block: nn.Module) -> nn.Module:
        mlp = block.mlp
        if _is_sparse(mlp) and hasattr(mlp.experts, "gate_up_proj"):
            if getattr(mlp.experts, "has_bias", False):
                raise ValueError("experts with biases are not supported yet (only Mixtral / Qwen-MoE style experts)")
            mlp.experts = UnfusedExperts(mlp.experts)
            mlp.gate = LETRouter(mlp.gate)
        return block

    def finish_block(self, block: nn.Module) -> nn.Module:
        mlp = block.mlp
        if isinstance(getattr(mlp, "experts", None), UnfusedExperts):
            if isinstance(mlp.gate, LETRouter):
                mlp.gate = mlp.gate.router
            if mlp.experts.fusable():  # weight-activation blocks keep their input quantizers: left unfused
                mlp.experts = mlp.experts.fuse()
        return block

    @contextlib.contextmanager
    def export_layout(self, model: nn.Module) -> Iterator[None]:
        """Experts left unfused (weight-activation: they keep their input quantizers) are saved fused; the
        quantizers are re-attached on load (``export.load_fake_quant``)."""
        swapped = []
        for block in self.blocks(model):
            experts = getattr(block.mlp, "experts", None)
            if isinstance(experts, UnfusedExperts):
                swapped.append((block.mlp, experts))
                block.mlp.experts = experts.fuse()
        try:
            yield
        finally:
            for mlp, experts in swapped:
                mlp.experts = experts

    def residual_writers(self, block: nn.Module) -> ResidualWriters:
        mlp = block.mlp
        if not _is_sparse(mlp):
            return ResidualWriters(linears=("self_attn.o_proj", "mlp.down_proj"))
        assert isinstance(mlp.experts, UnfusedExperts), "prepare_block() the block first"
        downs = tuple(f"mlp.experts.{e}.down_proj" for e in range(len(mlp.experts)))
        shared = ("mlp.shared_expert.down_proj",) if hasattr(mlp, "shared_expert") else ()
        return ResidualWriters(linears=("self_attn.o_proj", *downs, *shared))

    def keep_full_precision(self, block: nn.Module) -> set[str]:
        return {"mlp.shared_expert_gate"} if hasattr(block.mlp, "shared_expert_gate") else set()

    def sites(self, block: nn.Module) -> list[TransformSite]:
        sites = attention_sites(block, "input_layernorm")
        mlp = block.mlp
        if not _is_sparse(mlp):
            return sites + gated_mlp_sites(NORM)
        assert isinstance(mlp.experts, UnfusedExperts), "prepare_block() the block first"
        targets = ["mlp.gate"] + [f"mlp.experts.{e}.{p}" for e in range(len(mlp.experts)) for p in ("gate_proj", "up_proj")]
        if hasattr(mlp, "shared_expert"):
            targets += ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"]
        sites.append(TransformSite("mlp_in", "norm", NORM, tuple(targets)))
        for e in range(len(mlp.experts)):
            sites.append(gated_mlp_sites(NORM, f"mlp.experts.{e}.", name=f"up_down_e{e}")[1])
        if hasattr(mlp, "shared_expert"):
            sites.append(gated_mlp_sites(NORM, "mlp.shared_expert.", name="up_down_shared")[1])
        return sites

