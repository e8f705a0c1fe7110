"""How per-channel factors map onto attention heads: grouped-query attention and rotary pairs (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Heads:
    """``n_heads`` query heads share ``n_kv`` key/value heads of ``head_dim`` channels each."""

    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def rep(self) -> int:
        return self.n_heads // self.n_kv

    def per_kv_head(self, t: torch.Tensor) -> torch.Tensor:
        """``[n_heads * hd]`` -> ``[n_kv * hd]``: the max over the query heads of each group (statistics)."""
        return t.view(self.n_kv, self.rep, self.head_dim).amax(1).reshape(-1)

    def to_query_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[n_kv * hd]`` -> ``[n_heads * hd]``: one factor per value channel, shared by its query heads."""
        return t.view(self.n_kv, 1, self.head_dim).expand(self.n_kv, self.rep, self.head_dim).reshape(-1)

    def rotary_k(self, p: torch.Tensor) -> torch.Tensor:
        """``[n_kv, hd/2]`` -> ``[n_kv * hd]``: the same factor on rotary pair (i, i + hd/2), so RoPE commutes."""
        return torch.cat([p, p], dim=-1).reshape(-1)

    def rotary_q(self, p: torch.Tensor) -> torch.Tensor:
        return self.to_query_heads(self.rotary_k(p))

    @property
    def qk_shape(self) -> tuple[int, int]:
        return (self.n_kv, self.head_dim // 2)


def heads_of(attn) -> Heads:
    cfg = attn.config
    return Heads(cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim)
