"""Learnable Equivalent Transformation (LET): per-channel scales and shifts moved between two ops.

For an op ``A`` feeding a linear ``B`` (``y = B(A(x))``), a scale ``s`` and shift ``d`` per channel of
``A``'s output give the same function with ``A' = (A - d) / s`` and ``B'(z) = B(z * s + d)``: ``B``'s
weight columns are multiplied by ``s`` and its bias gains ``W @ d``. The transformed tensors are what
gets quantized, so the transform can move activation outliers into weights, where they are easier to
quantize, without changing the full-precision function. All math here is pure functions; the modules
only hold the learnable factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from omniq_lightning.quant import truncate_ste

MIN_SCALE = 1e-5


def scale_input_columns(w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, shift: torch.Tensor | None):
    """``B'`` for an input that was transformed to ``(z - shift) / s``: columns times ``s``, bias plus ``W @ shift``."""
    if shift is not None:
        extra = w @ shift.to(w.dtype)
        b = extra if b is None else b + extra
    return w * s.to(w.dtype), b


def scale_output_rows(w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, shift: torch.Tensor | None = None):
    """``A'`` for a linear ``A`` whose output becomes ``(A(x) - shift) / s``: rows divided by ``s``."""
    if shift is not None:
        b = -shift.to(w.dtype) if b is None else b - shift.to(w.dtype)
    return w / s.to(w.dtype)[:, None], None if b is None else b / s.to(w.dtype)


def smoothquant_scale(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's migration scale ``max|X|^alpha / max|W|^(1-alpha)`` per input channel."""
    act = act_absmax.float().clamp(min=MIN_SCALE)
    wt = weight_absmax.float().clamp(min=MIN_SCALE)
    return (act.pow(alpha) / wt.pow(1 - alpha)).clamp(min=MIN_SCALE)


def midpoint_shift(act_min: torch.Tensor, act_max: torch.Tensor) -> torch.Tensor:
    """Outlier Suppression+ shift: the middle of each channel's range."""
    return ((act_min.float() + act_max.float()) / 2).detach()


class LETNorm(nn.Module):
    """A norm whose output is transformed to ``(norm(x) - shift) / scale`` while LET is active."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self._let: tuple[torch.Tensor, torch.Tensor | None] | None = None  # a tuple: never registered

    def set_let(self, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
        self._let = (scale, shift)

    def clear_let(self) -> None:
        self._let = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self._let is None:
            return y
        scale, shift = self._let
        if shift is not None:
            y = y - shift.to(y.dtype)
        return y / scale.to(y.dtype)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The wrapped norm with the transform written into its affine weight (and bias)."""
        norm = self.norm
        if self._let is not None:
            scale, shift = self._let
            s = scale.to(norm.weight.dtype)
            bias = getattr(norm, "bias", None)
            if shift is not None:
                assert bias is not None, "a shift needs a norm with a bias to absorb it"
                bias.data = (bias - shift.to(bias.dtype)) / s
            elif bias is not None:
                bias.data = bias / s
            norm.weight.data = norm.weight / s
        self._let = None
        return norm


@dataclass
class LETPairSpec:
    """An adapter's description of one LET pair inside a block.

    kind:
      ``"norm"``   norm ``source`` -> linears ``targets`` (scale over the norm's channels)
      ``"linear"`` linear ``source`` rows -> linear ``targets`` columns (e.g. v -> o)
      ``"qk"``     q rows divided, k rows multiplied (``source`` = q, ``targets`` = [k]); QK^T unchanged
    expand_source / expand_target map the learnable factor to the source's / targets' channels (used for
    grouped-query attention and for one scale per rotary pair).
    """

    name: str
    kind: str
    source: str
    targets: list[str]
    scale_init: torch.Tensor
    shift_init: torch.Tensor | None = None
    expand_source: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)
    expand_target: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)


class LETPair(nn.Module):
    """Holds one pair's learnable scale (and shift); knows its modules by name within the block."""

    def __init__(self, spec: LETPairSpec) -> None:
        super().__init__()
        if spec.kind not in ("norm", "linear", "qk"):
            raise ValueError(f"unknown LET pair kind {spec.kind!r}")
        self.kind, self.source, self.targets = spec.kind, spec.source, list(spec.targets)
        self.expand_source, self.expand_target = spec.expand_source, spec.expand_target
        self.scale = nn.Parameter(spec.scale_init.detach().float().clone())
        self.shift = None if spec.shift_init is None else nn.Parameter(spec.shift_init.detach().float().clone())
        self.min_scale = 0.0  # OmniQuant truncates |scale| at 1e-2 while training (the method sets it)

    def effective_scale(self) -> torch.Tensor:
        """The scale as applied: truncated to ``|s| >= min_scale`` (straight-through), so a half-precision
        forward never divides by a tiny scale; folding uses the same value, so the fold stays exact."""
        return truncate_ste(self.scale, self.min_scale)

    def apply(self, block: nn.Module) -> None:
        """Set the transformed tensors on the modules of ``block`` (``set_let``)."""
        scale = self.effective_scale()
        s_src, s_tgt = self.expand_source(scale), self.expand_target(scale)
        d_src = None if self.shift is None else self.expand_source(self.shift)
        d_tgt = None if self.shift is None else self.expand_target(self.shift)
        src = block.get_submodule(self.source)
        if self.kind == "norm":
            src.set_let(s_src, d_src)
            for name in self.targets:
                lin = block.get_submodule(name)
                lin.set_let(*scale_input_columns(*lin.effective(), s_tgt, d_tgt))
        elif self.kind == "linear":
            src.set_let(*scale_output_rows(*src.effective(), s_src, d_src))
            for name in self.targets:
                lin = block.get_submodule(name)
                lin.set_let(*scale_input_columns(*lin.effective(), s_tgt, d_tgt))
        else:  # qk: q / s, k * s keeps every q.k product
            src.set_let(*scale_output_rows(*src.effective(), s_src))
            for name in self.targets:
                lin = block.get_submodule(name)
                lin.set_let(*scale_output_rows(*lin.effective(), 1.0 / s_tgt))

    def extra_repr(self) -> str:
        trunc = f", |scale| >= {self.min_scale:g}" if self.min_scale else ""
        return f"{self.kind}: {self.source} -> {', '.join(self.targets)}, shift={self.shift is not None}{trunc}"
