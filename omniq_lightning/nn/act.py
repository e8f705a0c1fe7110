"""`ActQuantizer`: fake-quantizes activations per token (dynamic) or per tensor (static, observed range)."""

from __future__ import annotations

import torch
from torch import nn

from omniq_lightning.quant import fake_quant_per_tensor, fake_quant_per_token, tensor_range_params
from omniq_lightning.quant.spec import NO_QUANT_BITS


class ActQuantizer(nn.Module):
    """Per-token ranges are taken from each token at run time; a per-tensor range is observed first.

    To calibrate a static range, run data through with ``observing = True`` (values pass unchanged
    and the running min/max are recorded), then set it back to False.
    """

    def __init__(self, bits: int, granularity: str = "token", symmetric: bool = False) -> None:
        super().__init__()
        self.bits, self.granularity, self.symmetric = bits, granularity, symmetric
        self.ranges = "detached"  # per-token: or "released" (differentiable min/max), set by the method
        self.observing = False
        if granularity == "tensor":
            self.register_buffer("lo", torch.tensor(float("inf")))
            self.register_buffer("hi", torch.tensor(float("-inf")))

    def reset_range(self) -> None:
        """Forget the observed range (a static quantizer must be observed again before use)."""
        if self.granularity == "tensor":
            self.lo.fill_(float("inf"))
            self.hi.fill_(float("-inf"))

    @property
    def active(self) -> bool:
        return self.bits != NO_QUANT_BITS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if self.granularity == "token":
            return fake_quant_per_token(x, self.bits, self.symmetric, self.ranges)
        if self.observing:
            with torch.no_grad():
                self.lo.copy_(torch.minimum(self.lo, x.detach().min().float()))
                self.hi.copy_(torch.maximum(self.hi, x.detach().max().float()))
            return x
        if not torch.isfinite(self.lo):
            raise RuntimeError("a per-tensor activation quantizer was used before its range was observed")
        scale, zero = tensor_range_params(self.lo, self.hi, self.bits, self.symmetric)
        return fake_quant_per_tensor(x, scale.to(x.device), zero.to(x.device), self.bits, self.symmetric)

    def extra_repr(self) -> str:
        return f"a{self.bits} per-{self.granularity} {'sym' if self.symmetric else 'asym'}"
