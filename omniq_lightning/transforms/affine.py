"""Learned affine transforms (FlatQuant, Sun et al. 2025): OmniQuant's LET generalised from diagonal to dense.

At a site, an invertible ``P`` moves between an activation and the linears that read it:
``y = x W^T = (x P)(W P^{-T})^T``. ``P`` is learned on the block-output loss with the weight clipping (the block's
trainable set stays transform factors and clipping logits). It is Kronecker-factored, ``P = A (x) B`` with
``A`` ``n1 x n1`` and ``B`` ``n2 x n2`` (``n = n1 n2``, ``n1`` the largest divisor of ``n`` not above its square root),
so applying it costs ``O(n^1.5)`` per token and inverting it two small inversions.

Where it folds and where it stays online (``location`` of the site):

* ``norm`` (norm -> q/k/v, norm -> gate/up): a dense ``P`` cannot fold into a norm, so it runs online in each
  reader's input-transform slot (``x P``), the readers' weights holding ``W P^{-T}``;
* ``up_down`` (the down projection's input): online likewise;
* ``vo``: one ``P`` per value-head width, folded into v's rows (``P^T W_v`` per head) and o's columns
  (``W_o P^{-T}`` per query head): no online part.

Both factors start at the identity: the transform starts as no transform (after a QuaRot rotation, at its
rotated model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from omniq_lightning.nn import QuantLinear
from omniq_lightning.transforms.sites import TransformSite

AFFINE_LOCATIONS = ("norm", "vo", "up_down")


def kron_factors(n: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1 * n2 = n``, ``n1`` the largest divisor of ``n`` not above ``sqrt(n)``."""
    n1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return n1, n // n1


def kron_right(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ (a (x) b)`` along the last dimension, without forming the Kronecker product: ``a^T X b`` with ``X``
    the last dimension viewed as ``[n1, n2]``."""
    n1, n2 = a.shape[0], b.shape[0]
    xv = x.reshape(*x.shape[:-1], n1, n2)
    return torch.matmul(a.T.to(x.dtype), torch.matmul(xv, b.to(x.dtype))).reshape(x.shape)


class KroneckerAffine(nn.Module):
    """A learnable invertible ``P = A (x) B``: ``forward(x) = x P`` (online), ``fold(W) = W P^{-T}``."""

    def __init__(self, n: int, device=None) -> None:
        super().__init__()
        self.n = n
        n1, n2 = kron_factors(n)
        self.a = nn.Parameter(torch.eye(n1, device=device))
        self.b = nn.Parameter(torch.eye(n2, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = kron_right(x.float() if dtype in (torch.float16, torch.bfloat16) else x, self.a, self.b)
        return y.to(dtype)

    def fold(self, w: torch.Tensor) -> torch.Tensor:
        """``W P^{-T}`` (rows transformed as ``x -> x P^{-T}``, ``P^{-T} = A^{-T} (x) B^{-T}``)."""
        a_inv, b_inv = torch.linalg.inv(self.a.float()), torch.linalg.inv(self.b.float())
        return kron_right(w.float(), a_inv.T, b_inv.T).to(w.dtype)

    def matrix(self) -> torch.Tensor:
        """``P`` as a dense float64 matrix (for tests)."""
        return torch.kron(self.a.double(), self.b.double())

    def extra_repr(self) -> str:
        return f"n={self.n} ({self.a.shape[0]} x {self.b.shape[0]} Kronecker)"


class AffinePair(nn.Module):
    """One learned affine transform at a site; ``apply(block)`` sets the readers' transformed weights (``set_let``,
    as the diagonal pairs do) and, where it runs online, puts the transform in their input-transform slots."""

    def __init__(self, site: TransformSite, block: nn.Module) -> None:
        super().__init__()
        if site.location not in AFFINE_LOCATIONS:
            raise ValueError(f"no affine transform at a {site.location} site (locations: {AFFINE_LOCATIONS})")
        self.location, self.source = site.location, site.source
        # the readers that take the transform: quantized linears (an MoE router reads the untransformed input)
        self.targets = [t for t in site.targets if isinstance(block.get_submodule(t), QuantLinear)]
        self.source_rows, self.heads = site.source_rows, site.heads
        if site.location == "vo":
            device = block.get_submodule(site.source).weight.device
            self.transform = KroneckerAffine(site.heads.head_dim, device)
        else:
            first = block.get_submodule(self.targets[0])
            self.transform = KroneckerAffine(first.in_features, first.weight.device)
            for name in self.targets:  # online: the readers' slots hold the transform (after one already there)
                lin = block.get_submodule(name)
                lin.input_transform = (self.transform if lin.input_transform is None
                                       else nn.Sequential(lin.input_transform, self.transform))

    def apply(self, block: nn.Module) -> None:
        if self.location == "vo":
            self.apply_heads(block)
            return
        for name in self.targets:
            lin = block.get_submodule(name)
            w, b = lin.effective()
            lin.set_let(self.transform.fold(w), b)

    def apply_heads(self, block: nn.Module) -> None:
        """v's rows ``P^T W_v`` per value head (bias likewise), o's columns ``W_o P^{-T}`` per query head."""
        h, p = self.heads, self.transform
        v = block.get_submodule(self.source)
        w, b = v.effective()
        a, z = self.source_rows if self.source_rows is not None else (0, w.shape[0])
        rows = w[a:z].reshape(h.n_kv, h.head_dim, -1).transpose(1, 2)  # [kv heads, in, hd]: each row x P below
        rows = p(rows).transpose(1, 2).reshape(z - a, -1)
        w = torch.cat([w[:a], rows, w[z:]])
        if b is not None:
            b = torch.cat([b[:a], p(b[a:z].reshape(h.n_kv, h.head_dim)).reshape(-1), b[z:]])
        v.set_let(w, b)
        for name in self.targets:
            o = block.get_submodule(name)
            wo, bo = o.effective()
            cols = p.fold(wo.reshape(wo.shape[0], h.n_heads, h.head_dim)).reshape(wo.shape)
            o.set_let(cols, bo)

    def extra_repr(self) -> str:
        online = "" if self.location == "vo" else ", online"
        return f"affine {self.location}: {self.source} -> {', '.join(self.targets)}{online}"
