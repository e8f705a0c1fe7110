"""RPTQ's reorder-based clustering of activation channels (Yuan et al. 2023, hahnyuan/RPTQ4LLM).

What makes LLM activations hard to quantize is how differently the channels' ranges vary. RPTQ clusters
the channels of an activation by their (max, min) over the calibration tokens (k-means, a fixed seed),
orders them so that each cluster is contiguous (the permutation is the argsort of the labels) and
quantizes each cluster with its own range.

Sites (adapters declare them as :class:`~omniq_lightning.transforms.sites.TransformSite`):

| RPTQ | site (location) | activation | reorder |
|---|---|---|---|
| R1 | ``attn_in`` (norm) | the input norm's output (q/k/v inputs) | clustered in place (see below) |
| R2 | ``qk`` | post-rotary q and k, per key head | clustered in place, one clustering shared by q and k |
| R3 | ``vo`` | v (the value cache) and the o_proj input, per key/value head | v rows and o_proj columns permuted (folded) |
| R4 | ``mlp_in`` (norm) | the post-attention norm's output (gate/up, fc1 inputs) | clustered in place |
| R5 | ``up_down`` | the down_proj (fc2) input | gate and up (fc1) rows and down (fc2) columns permuted (folded) |

R3 and R5 are folded into the weights exactly: no op sits between v and o (attention mixes tokens, not
channels) or between gate/up and down (the gated activation is elementwise), so the permutation passes
through. R1 and R4 are norm outputs: permuting a norm's output needs the norm's input (the residual
stream) permuted, or a gather fused into the norm (RPTQ's reorder-layernorm kernel); R2 sits after RoPE,
whose frequencies are tied to channel positions by one table shared by every head, so a permutation of
the q/k projections' rows does not commute with it (moving rotary pairs together is not enough: pair p
must keep frequency p). At these three sites the quantizer maps each channel to its cluster (the same
numbers a reordered, contiguous layout gives) and the weights stay where they are.
"""

from __future__ import annotations

import torch
from torch import nn

from omniq_lightning.quant.kmeans import kmeans


def range_points(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Each channel as the point (max, min) of its values over the calibration tokens: ``[channels, 2]``."""
    return torch.stack([hi.float(), lo.float()], dim=-1)


def cluster_labels(points: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k-means of the channels' points ``[channels, d]`` into ``k`` clusters; clusters numbered by their
    centroid's first coordinate (the max), so the numbering is deterministic."""
    k = min(k, points.shape[0])
    centroids, labels = kmeans(points.float(), k, seed=seed)
    rank = torch.empty(k, dtype=torch.long)
    rank[torch.argsort(centroids[:, 0], stable=True)] = torch.arange(k)
    return rank[labels]


def head_labels(points: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Clusters within each head (``points``: ``[heads, channels, d]``): labels ``[heads, channels]`` numbered
    ``h * k + j``, every head with its own ``k`` clusters."""
    k = min(k, points.shape[1])
    return torch.stack([cluster_labels(points[h], k, seed) + h * k for h in range(points.shape[0])])


def permutation(labels: torch.Tensor) -> torch.Tensor:
    """The order that makes every cluster contiguous: a stable argsort of the labels."""
    return torch.argsort(labels, stable=True)


def head_permutation(labels: torch.Tensor) -> torch.Tensor:
    """Per head (rows of ``labels``), the permutation of its channels, as one permutation of all heads' channels."""
    n, d = labels.shape
    return torch.cat([h * d + permutation(labels[h]) for h in range(n)])


@torch.no_grad()
def permute_rows(lin: nn.Module, perm: torch.Tensor) -> None:
    lin.weight.data = lin.weight.data[perm].contiguous()
    if getattr(lin, "bias", None) is not None:
        lin.bias.data = lin.bias.data[perm].contiguous()


@torch.no_grad()
def permute_columns(lin: nn.Module, perm: torch.Tensor) -> None:
    lin.weight.data = lin.weight.data[:, perm].contiguous()


def expand_to_query_heads(perm_kv: torch.Tensor, n_kv: int, rep: int, head_dim: int) -> torch.Tensor:
    """A permutation of the value heads' channels ``[n_kv * hd]`` as one of the query heads' ``[n_kv * rep * hd]``
    (each query head follows the permutation of the value head it reads)."""
    per_head = perm_kv.view(n_kv, head_dim) - (torch.arange(n_kv) * head_dim)[:, None]
    out = [q * head_dim + per_head[q // rep] for q in range(n_kv * rep)]
    return torch.cat(out)
