"""Transform sites: where an invertible transform can sit inside a block, as an adapter declares it.

A site is a place in the block's dataflow between the ops that produce an activation and the linears that
consume it. Which kind of transform sits there is the method's choice; whether it folds into the weights is
the site's ``location``:

| location | activation | diagonal (LET, AWQ, SmoothQuant) | permutation (RPTQ) |
|---|---|---|---|
| ``norm`` | a norm's output, read by ``targets`` | folds into the norm and the targets' columns | in place (per-cluster ranges): the residual stream would have to move |
| ``vo`` | the value heads, read by ``targets`` (o) | folds into v's rows and o's columns (per value channel under GQA) | folds, per head |
| ``qk`` | the query and key heads after the projections | folds per rotary pair (q / s, k * s), unless q/k are normalised per head | in place: RoPE ties channels to positions |
| ``up_down`` | the MLP's inner activation, read by ``targets`` (down) | folds into ``source``'s rows (up) | folds into every producer's rows (gate and up) |

A transform that cannot fold runs online in the consumer's input-transform slot (``QuantLinear.input_transform``,
``QuantMatMul.input_transform``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LOCATIONS = ("norm", "vo", "qk", "up_down")
Rows = tuple[int, int] | None  # a row slice [start, stop) of a fused linear (Phi-3's qkv_proj, gate_up_proj)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class HeadLayout:
    """Attention heads at a site: ``n_heads`` query heads share ``n_kv`` key/value heads of ``head_dim`` channels."""

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
        """One factor per rotary pair of each key head."""
        return (self.n_kv, self.head_dim // 2)


@dataclass(frozen=True)
class TransformSite:
    """One site of a block (names within the block; structure only, no values).

    name: unique within the block (``attn_in``, ``mlp_in``, ``vo``, ``qk``, ``up_down``, ``up_down_e3``, ...).
    location: see the module table.
    source: the op a diagonal transform divides (the norm; v; q; up), or None where there is none (a post-LN
      block's attention input).
    targets: the linears that consume the activation (``qk``: the key projection).
    producers: the linears whose output rows a permutation moves (``up_down``: gate and up); default: ``source``.
    source_rows: for a fused source (Phi-3), the row slice the transform applies to.
    expand_source / expand_target: map a diagonal factor to the source's / targets' channels (grouped-query
      attention; one scale per rotary pair).
    reduce: map per-channel statistics of the targets' input to the factor's shape (e.g. the max over the query
      heads that share a key/value head).
    absorbs_shift: the source has a bias that can absorb a shift (OPT's LayerNorm and v_proj).
    qk_shape: the diagonal factor's shape at a ``qk`` site (it starts at ones).
    positive: a diagonal factor is exact only when positive (a ReLU between the ops: OPT's fc1 -> fc2).
    heads: the head layout (``vo`` and ``qk`` sites).
    diagonal_folds: whether a diagonal transform folds exactly here (not after a per-head q/k norm, not
      without a norm to divide).
    """

    name: str
    location: str
    source: str | None
    targets: tuple[str, ...]
    producers: tuple[str, ...] = ()
    source_rows: Rows = None
    expand_source: Callable[[torch.Tensor], torch.Tensor] = _identity
    expand_target: Callable[[torch.Tensor], torch.Tensor] = _identity
    reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
    absorbs_shift: bool = False
    qk_shape: tuple[int, ...] | None = None
    positive: bool = False
    heads: HeadLayout | None = None
    diagonal_folds: bool = True

    def __post_init__(self) -> None:
        if self.location not in LOCATIONS:
            raise ValueError(f"unknown site location {self.location!r}; locations are {LOCATIONS}")
        if self.diagonal_folds and self.source is None:
            raise ValueError(f"site {self.name}: a diagonal transform needs a source to fold into")
        if not self.producers and self.source is not None:
            object.__setattr__(self, "producers", (self.source,))
