"""Weight format kinds: what each kind of per-linear weight format brings to the rest of the library.

A kind is registered once, with

* its format type (a frozen dataclass in ``quant/``: ``kind``, ``quantized``, ``name``, ``validate_shape(out, in)``,
  ``storage_bits(out, in)``, ``to_dict()``), which ``quant.spec.format_from_dict`` then reads back;
* its stored codes type (``shape``, ``fmt``, ``dequantize()``, ``to(device)``, ``tensors(prefix)`` and the
  classmethod ``from_tensors(tensors, prefix, fmt)``), in which a finished block keeps every linear's weight;
* its quantizer factory ``(fmt, out_features, in_features, spec, device) -> WeightQuantizerBase``, or None when
  the method that fits the kind sets the codes itself (vector quantization);
* its capabilities, which methods ask for (``Method.format_needs``): ``quantizer`` (a weight quantizer that
  fake-quantizes and rounds), ``grid`` (per-group scalar grids with clipping logits: AWQ's searches, OmniQuant's
  starts), ``columns`` (GPTQ's column-wise rounding on the grid), ``codebook`` (k-means codebooks: VPTQ);
* a hint naming what calibrates it, for refusals.

Nothing else branches on a format's kind: ``QuantLinear`` builds the quantizer the kind names, a finished block's
codes are read back through the kind's codes type, exporters say which kinds they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from omniq_lightning.nn.weight import WeightQuantizer, WeightQuantizerBase
from omniq_lightning.quant import QuantizedWeight, QuantSpec, WeightFormat
from omniq_lightning.quant.functional import check_ranges
from omniq_lightning.quant.gguf import (
    GGUFCodes,
    GGUFFormat,
    gguf_codes_on,
    gguf_column_quantizer,
    gguf_fake_quant,
    gguf_quantize,
    gguf_type,
)
from omniq_lightning.quant.spec import FORMAT_TYPES, VectorFormat, register_format_type
from omniq_lightning.quant.vq import VectorQuantizedWeight

QuantizerFactory = Callable[..., WeightQuantizerBase]
CAPABILITIES = ("quantizer", "grid", "columns", "codebook")


@dataclass(frozen=True)
class FormatKind:
    name: str
    format_type: type
    codes_type: type
    quantizer: QuantizerFactory | None
    capabilities: frozenset[str]
    hint: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.capabilities) - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"unknown format capabilities {unknown}; capabilities are {CAPABILITIES}")
        if getattr(self.format_type, "kind", None) != self.name:
            raise ValueError(f"format type {self.format_type.__name__} has kind {getattr(self.format_type, 'kind', None)!r}, "
                             f"not {self.name!r}")


FORMAT_KINDS: dict[str, FormatKind] = {}


def register_format_kind(kind: FormatKind) -> FormatKind:
    """Add a weight format kind (see the module docstring); its format type becomes readable from configs."""
    if kind.name in FORMAT_KINDS and FORMAT_KINDS[kind.name] != kind:
        raise ValueError(f"weight format kind {kind.name!r} is already registered")
    if kind.format_type is not FORMAT_TYPES.get(kind.name):
        register_format_type(kind.format_type)
    FORMAT_KINDS[kind.name] = kind
    return kind


def kind_of(fmt) -> FormatKind:
    """The registered kind of a weight format."""
    name = getattr(fmt, "kind", None)
    if name not in FORMAT_KINDS:
        raise ValueError(f"weight format {fmt!r} is of no registered kind ({sorted(FORMAT_KINDS)}): register it with "
                         "omniq_lightning.nn.formats.register_format_kind")
    return FORMAT_KINDS[name]


def make_quantizer(fmt, out_features: int, in_features: int, spec: QuantSpec, device=None) -> WeightQuantizerBase | None:
    """The weight quantizer of a linear in ``fmt`` (None: its method sets the codes, or the weight stays 16-bit)."""
    if not fmt.quantized:
        return None
    factory = kind_of(fmt).quantizer
    return None if factory is None else factory(fmt, out_features, in_features, spec, device)


def for_shape(fmt, out_features: int, in_features: int):
    """The format a ``[out, in]`` linear takes when ``fmt`` is asked for: a format type may define ``for_shape`` (a
    GGUF K-type falls back, as llama.cpp does, where its super-block does not divide the row); else ``fmt``."""
    resolve = getattr(fmt, "for_shape", None)
    return fmt if resolve is None else resolve(out_features, in_features)


def format_record(fmt) -> dict:
    """A format as recorded beside its codes (its ``to_dict()`` with its kind), read back by ``format_from_dict``."""
    return {**fmt.to_dict(), "kind": fmt.kind}


def read_codes(tensors, prefix: str, fmt):
    """A linear's stored codes (as ``codes.tensors(prefix)`` wrote them) in format ``fmt``."""
    return kind_of(fmt).codes_type.from_tensors(tensors, prefix, fmt)


def _scalar_quantizer(fmt: WeightFormat, out_features: int, in_features: int, spec: QuantSpec, device=None):
    return WeightQuantizer(fmt, out_features, in_features, spec.lwc, spec.lwc_init, device=device)


register_format_kind(FormatKind("scalar", WeightFormat, QuantizedWeight, _scalar_quantizer,
                                frozenset({"quantizer", "grid", "columns"})))


class GGUFQuantizer(WeightQuantizerBase):
    """A weight in a GGUF type: fake quantization on the type's exact grid, with LWC logits per group."""

    def __init__(self, fmt: GGUFFormat, out_features: int, in_features: int, lwc: bool, lwc_init: float,
                 device=None) -> None:
        fmt.validate_shape(out_features, in_features)
        super().__init__(fmt)
        self.gtype = gguf_type(fmt.type)
        self.ranges = "detached"
        if lwc:
            init = torch.full((out_features, in_features // self.gtype.group), float(lwc_init), device=device)
            self.lwc_gamma, self.lwc_beta = nn.Parameter(init.clone()), nn.Parameter(init.clone())

    def set_ranges(self, ranges: str) -> None:
        self.ranges = check_ranges(ranges)

    @torch.no_grad()
    def set_clip(self, gamma_logits, beta_logits=None) -> None:
        beta_logits = gamma_logits if beta_logits is None else beta_logits
        for p, v in ((self.lwc_gamma, gamma_logits), (self.lwc_beta, beta_logits)):
            p.copy_(torch.as_tensor(v, dtype=p.dtype, device=p.device).expand_as(p))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return gguf_fake_quant(w, self.gtype, self.lwc_gamma, self.lwc_beta, self.ranges)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> GGUFCodes:
        return gguf_quantize(w, self.fmt, self.lwc_gamma, self.lwc_beta)

    def enable_rounding(self) -> None:
        raise ValueError("learned rounding offsets are not implemented for GGUF types: use method.rounding=gptq "
                         "(GPTQ on the learned grid) instead of method.learn_rounding")

    @property
    def clip_group(self) -> int:
        return self.gtype.group

    def fake_quant_with(self, w, gamma=None, beta=None) -> torch.Tensor:
        return gguf_fake_quant(w, self.gtype, gamma, beta)

    @torch.no_grad()
    def column_quantizer(self, w: torch.Tensor):
        return gguf_column_quantizer(w, self.gtype, self.lwc_gamma, self.lwc_beta)

    def codes_on(self, w_hat: torch.Tensor, grid) -> GGUFCodes:
        return gguf_codes_on(w_hat, grid, self.fmt)


def _gguf_quantizer(fmt: GGUFFormat, out_features: int, in_features: int, spec: QuantSpec, device=None):
    return GGUFQuantizer(fmt, out_features, in_features, spec.lwc, spec.lwc_init, device)


register_format_kind(FormatKind("gguf", GGUFFormat, GGUFCodes, _gguf_quantizer,
                                frozenset({"quantizer", "grid", "columns"})))
register_format_kind(FormatKind("vector", VectorFormat, VectorQuantizedWeight, None, frozenset({"codebook"}),
                                hint="vector formats are fitted by method=vptq"))
