"""`QuantLinear`: a linear layer with a fake-quantized weight (LWC) and an optional input quantizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omniq_lightning.nn.act import ActQuantizer
from omniq_lightning.quant import QuantSpec, fake_quant_weight, validate_weight


class QuantLinear(nn.Module):
    """Replaces an ``nn.Linear``. The original weight and bias are frozen; the only trainable tensors
    are the LWC logits ``lwc_gamma`` and ``lwc_beta`` (one per output channel or group).

    An equivalent transform (LET) may :meth:`set_let` a transformed weight and bias before a forward
    pass: those are then quantized instead of the stored ones. :meth:`fold` writes the
    quantized effective weight into ``weight`` for good.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, quantize_input: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.w_bits, self.group_size, self.symmetric = spec.w_bits, spec.w_group_size, spec.w_symmetric
        self.weight_quant = spec.quantizes_weights
        if self.weight_quant:
            spec.validate_linear(self.in_features)
            validate_weight(self.weight, self.group_size)
        self.lwc_gamma: nn.Parameter | None = None
        self.lwc_beta: nn.Parameter | None = None
        if self.weight_quant and spec.lwc:
            groups = self.in_features // (self.group_size or self.in_features)
            init = torch.full((self.out_features, groups), float(spec.lwc_init), device=self.weight.device)
            self.lwc_gamma = nn.Parameter(init.clone())
            self.lwc_beta = nn.Parameter(init.clone())
        self.act_quant = (
            ActQuantizer(spec.a_bits, spec.a_granularity, spec.a_symmetric)
            if quantize_input and spec.quantizes_activations
            else None
        )
        self._let: tuple[torch.Tensor, torch.Tensor | None] | None = None  # a tuple: never registered as parameters

    def set_let(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._let = (weight, bias)

    def clear_let(self) -> None:
        self._let = None

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias before quantization: LET-transformed when a transform is active."""
        return (self.weight, self.bias) if self._let is None else self._let

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.effective()
        if self.weight_quant:
            w = fake_quant_weight(w, self.w_bits, self.group_size, self.symmetric, self.lwc_gamma, self.lwc_beta)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        w, b = self.quantized_weight()
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    @torch.no_grad()
    def fold_transform(self) -> None:
        """Write the LET-transformed (not yet quantized) weight and bias into ``weight`` and ``bias``."""
        if self._let is None:
            return
        w, b = self._let
        self.weight.data = w.to(self.weight.dtype).contiguous()
        if b is not None:
            if self.bias is None:
                self.bias = nn.Parameter(b.to(self.weight.dtype), requires_grad=False)
            else:
                self.bias.data = b.to(self.bias.dtype)
        self._let = None

    @torch.no_grad()
    def set_quantized_weight(self, w: torch.Tensor) -> None:
        """Store a weight that is already on its grid (e.g. from GPTQ): no further weight quantization."""
        self.weight.data = w.to(self.weight.dtype).contiguous()
        self.weight_quant = False
        self.lwc_gamma = self.lwc_beta = None

    @torch.no_grad()
    def fold(self) -> None:
        """Write the quantized (clipped, transformed) weight into ``weight``; drop LWC and LET state."""
        self.fold_transform()
        if self.weight_quant:
            self.set_quantized_weight(self.quantized_weight()[0])

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's (folded) weight; only valid without an input quantizer."""
        assert self.act_quant is None, "a layer that quantizes its input cannot become a plain nn.Linear"
        assert not self.weight_quant, "fold() the layer before converting it"
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.data.copy_(self.weight)
        if self.bias is not None:
            lin.bias.data.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        if self.weight_quant:
            grouping = f"g{self.group_size}" if self.group_size else "per-channel"
            w = f"w{self.w_bits} {grouping} {'sym' if self.symmetric else 'asym'}{' +LWC' if self.lwc_gamma is not None else ''}"
        else:
            w = "weights folded" if self.w_bits != 16 else "w16"
        return f"in_features={self.in_features}, out_features={self.out_features}, {w}"


def swap_linears(module: nn.Module, make) -> None:
    """Replace every ``nn.Linear`` below ``module`` by ``make(name, linear)`` (recursively, in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, make(name, child))
        else:
            swap_linears(child, make)
