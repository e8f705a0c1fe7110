"""`QuantLinear`: a linear layer with a fake-quantized weight and an optional input quantizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omniq_lightning.nn.act import ActQuantizer
from omniq_lightning.nn.formats import make_quantizer
from omniq_lightning.nn.weight import WeightQuantizerBase
from omniq_lightning.quant import QuantSpec
from omniq_lightning.quant.functional import check_floating


class QuantLinear(nn.Module):
    """Replaces an ``nn.Linear``. The original weight and bias are frozen; the trainable tensors live in its
    :class:`WeightQuantizer` ``wq`` (LWC logits, optional rounding offsets).

    An equivalent transform (LET) may :meth:`set_let` a transformed weight and bias before a forward
    pass: those are then quantized instead of the stored ones. :meth:`fold` writes the quantized
    effective weight into ``weight`` for good and keeps its stored codes in ``codes``.

    ``input_transform``: one slot for a transform of the input that runs online, before the input quantizer
    (e.g. a rotation whose inverse the weight holds: ``W x = (W R^T)(R x)``).
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, quantize_input: bool = True, fmt=None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.fmt = fmt if fmt is not None else spec.weight_format
        if self.fmt.quantized:
            check_floating("weight", self.weight, finite=True)
            self.fmt.validate_shape(self.out_features, self.in_features)
        # the format kind's quantizer; None for 16-bit weights and for kinds whose method sets the codes (VQ)
        self.wq: WeightQuantizerBase | None = make_quantizer(self.fmt, self.out_features, self.in_features, spec,
                                                             self.weight.device)
        self.codes = None  # the weight's stored codes (QuantizedWeight, VectorQuantizedWeight, ...), once folded
        self.act_quant = (
            ActQuantizer(spec.a_bits, spec.a_granularity, spec.a_symmetric, spec.lac_init if spec.lac else None)
            if quantize_input and spec.quantizes_activations
            else None
        )
        self.input_transform: nn.Module | None = getattr(linear, "input_transform", None)  # kept from an
        # OnlineInputLinear (a rotation whose inverse the weight already holds)
        self._let: tuple[torch.Tensor, torch.Tensor | None] | None = None  # a tuple: never registered as parameters

    @property
    def weight_quant(self) -> bool:
        """Whether the weight is still to be quantized (False once folded, or for 16-bit weights)."""
        return self.codes is None and self.fmt.quantized

    def set_let(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._let = (weight, bias)

    def clear_let(self) -> None:
        self._let = None

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias before quantization: LET-transformed when a transform is active."""
        return (self.weight, self.bias) if self._let is None else self._let

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.effective()
        return (w if self.wq is None else self.wq(w)), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
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
    def set_codes(self, q) -> None:
        """Store a weight that is already quantized (its codes): no further weight quantization."""
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight of shape {q.shape} does not fit a {self.out_features}x{self.in_features} layer")
        self.codes = q.to(self.weight.device)
        self.weight.data = self.codes.dequantize().to(self.weight.dtype).contiguous()
        self.wq = None

    @torch.no_grad()
    def fold(self) -> None:
        """Write the quantized (clipped, rounded, transformed) weight into ``weight``; drop LWC and LET state."""
        self.fold_transform()
        if self.wq is not None:
            self.set_codes(self.wq.quantize(self.weight))
        elif self.weight_quant:
            raise RuntimeError(f"this linear's weight format {self.fmt.name} is set by its method (e.g. method=vptq "
                               "for vector formats), which did not quantize it")

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's (folded) weight; only valid without an input quantizer or an
        online input transform."""
        assert self.act_quant is None and self.input_transform is None, \
            "a layer that quantizes or transforms its input cannot become a plain nn.Linear"
        assert not self.weight_quant, "fold() the layer before converting it"
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.data.copy_(self.weight)
        if self.bias is not None:
            lin.bias.data.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        if self.wq is not None:
            w = ""  # the weight quantizer explains itself
        elif self.codes is not None:
            w = f", {self.codes.fmt.name} folded"
        else:
            w = ", w16"
        return f"in_features={self.in_features}, out_features={self.out_features}{w}"


class OnlineInputLinear(nn.Linear):
    """An ``nn.Linear`` whose input is transformed online first (``input_transform``): how a full-precision model
    carries a rotation that cannot fold (QuaRot's R4 before the down projection, whose weight holds the inverse).
    Quantizing it keeps the transform in the ``QuantLinear``'s input-transform slot."""

    def __init__(self, linear: nn.Linear, transform: nn.Module) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.weight, self.bias = linear.weight, linear.bias
        self.input_transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_transform(x), self.weight, self.bias)


def swap_linears(module: nn.Module, make) -> None:
    """Replace every ``nn.Linear`` below ``module`` by ``make(name, linear)`` (recursively, in place);
    ``name`` is the linear's path below ``module``."""
    _swap(module, make, "")


def _swap(module: nn.Module, make, prefix: str) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if isinstance(child, nn.Linear):
            setattr(module, name, make(path, child))
        else:
            _swap(child, make, path + ".")
