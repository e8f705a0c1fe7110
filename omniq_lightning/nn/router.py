"""`LETRouter`: a mixture-of-experts router kept in full precision that an equivalence transform can scale."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


class LETRouter(nn.Module):
    """Wraps a router whose logits are ``F.linear(x, weight)`` (Mixtral, Qwen-MoE). The router reads the
    output of the norm that feeds the experts, so a transform on that norm must scale the router's weight
    columns too; the router itself is never quantized. While a transform is set, the wrapped router's own
    forward runs with the transformed weight (its softmax / top-k code is untouched)."""

    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router
        self.in_features = router.weight.shape[1]
        self._let: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.router.weight

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (self.router.weight, getattr(self.router, "bias", None)) if self._let is None else self._let

    def set_let(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if bias is not None and getattr(self.router, "bias", None) is None:
            raise ValueError("a shift on the router's input needs a router bias to absorb it")
        self._let = (weight, bias)

    def clear_let(self) -> None:
        self._let = None

    def forward(self, x: torch.Tensor):
        if self._let is None:
            return self.router(x)
        params = {"weight": self._let[0]} | ({} if self._let[1] is None else {"bias": self._let[1]})
        return functional_call(self.router, params, (x,))

    @torch.no_grad()
    def fold_transform(self) -> None:
        if self._let is not None:
            self.router.weight.data = self._let[0].to(self.router.weight.dtype).contiguous()
            if self._let[1] is not None:
                self.router.bias.data = self._let[1].to(self.router.bias.dtype)
        self._let = None
