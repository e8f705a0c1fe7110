"""Learnable Equivalent Transformation (LET): per-channel scales and shifts moved between two ops.

For an op ``A`` feeding a linear ``B`` (``y = B(A(x))``), a scale ``s`` and shift ``d`` per channel of
``A``'s output give the same function with ``A' = (A - d) / s`` and ``B'(z) = B(z * s + d)``: ``B``'s
weight columns are multiplied by ``s`` and its bias gains ``W @ d``. The transformed tensors are what
gets quantized, so the transform can move activation outliers into weights, where they are easier to
quantize, without changing the full-precision function.

Adapters *declare* where transforms can sit (:class:`~omniq_lightning.transforms.sites.TransformSite`:
structure only); this module turns a site into initial diagonal factors from the block's input statistics
(SmoothQuant scales, Outlier Suppression+ shifts) and holds the learnable factors. All math here is pure
functions; the modules only hold the factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from omniq_lightning.quant import truncate_ste
from omniq_lightning.transforms.sites import Rows, TransformSite, _identity

MIN_SCALE = 1e-5

# Per-channel input ranges of a block's linears (and routers), by module name within the block: name -> (min, max).
InputStats = dict[str, tuple[torch.Tensor, torch.Tensor]]


def scale_input_columns(w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, shift: torch.Tensor | None):
    """``B'`` for an input that was transformed to ``(z - shift) / s``: columns times ``s``, bias plus ``W @ shift``."""
    if shift is not None:
        extra = w @ shift.to(w.dtype)
        b = extra if b is None else b + extra
    return w * s.to(w.dtype), b


def scale_output_rows(w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, shift: torch.Tensor | None = None,
                      rows: Rows = None):
    """``A'`` for a linear ``A`` whose output (rows ``rows`` of it, for a fused linear) becomes
    ``(A(x) - shift) / s``: those rows divided by ``s``."""
    if rows is not None:
        a, z = rows
        part_w, part_b = scale_output_rows(w[a:z], None if b is None else b[a:z], s, shift)
        w = torch.cat([w[:a], part_w, w[z:]])
        if part_b is not None:
            b = torch.cat([b[:a], part_b, b[z:]]) if b is not None else torch.cat(
                [torch.zeros(a, dtype=w.dtype, device=w.device), part_b,
                 torch.zeros(w.shape[0] - z, dtype=w.dtype, device=w.device)])
        return w, b
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
    """A norm whose output is transformed to ``(norm(x) - shift) / scale`` while LET is active.

    ``offset`` is the norm's weight offset: 0 for ``x * w`` (LLaMA's RMSNorm, LayerNorm), 1 for Gemma's
    ``x * (1 + w)``; folding divides ``offset + w`` by the scale.
    """

    def __init__(self, norm: nn.Module, offset: float = 0.0) -> None:
        super().__init__()
        self.norm = norm
        self.offset = offset
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
            norm.weight.data = (norm.weight + self.offset) / s - self.offset
        self._let = None
        return norm


@dataclass
class LETPairSpec:
    """One diagonal transform at a site, with its initial factors (see :func:`initial_pair`)."""

    name: str
    location: str  # the site's: "norm" | "vo" | "qk" | "up_down"
    source: str
    targets: list[str]
    scale_init: torch.Tensor
    shift_init: torch.Tensor | None = None
    expand_source: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)
    expand_target: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity)
    source_rows: Rows = None
    positive: bool = False


def input_absmax(stats: InputStats, name: str, shift: torch.Tensor | None = None) -> torch.Tensor:
    lo, hi = stats[name]
    if shift is not None:
        lo, hi = lo - shift, hi - shift
    return torch.maximum(lo.abs(), hi.abs())


def weight_absmax(block: nn.Module, names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """Per input column: the largest |w| over the rows of all named linears (or routers)."""
    return torch.cat([block.get_submodule(n).weight.detach().float() for n in names]).abs().amax(0)


def initial_pair(site: TransformSite, block: nn.Module, stats: InputStats, alpha: float,
                 shift: bool) -> LETPairSpec | None:
    """A diagonal transform at ``site`` with SmoothQuant scales (``alpha``) and, where the source can absorb one
    and ``shift`` allows, an Outlier Suppression+ shift. None when its targets saw no calibration tokens (an MoE
    expert no token was routed to): that site is left out."""
    common = dict(expand_source=site.expand_source, expand_target=site.expand_target, source_rows=site.source_rows,
                  positive=site.positive)
    if site.location == "qk":
        device = block.get_submodule(site.source).weight.device
        return LETPairSpec(site.name, site.location, site.source, list(site.targets),
                           torch.ones(site.qk_shape, device=device), **common)
    if site.targets[0] not in stats:
        return None
    lo, hi = stats[site.targets[0]]
    d = midpoint_shift(lo, hi) if shift and site.absorbs_shift else None
    act = site.reduce(input_absmax(stats, site.targets[0], d))
    scale = smoothquant_scale(act, site.reduce(weight_absmax(block, site.targets)), alpha)
    return LETPairSpec(site.name, site.location, site.source, list(site.targets), scale, d, **common)


class LETPair(nn.Module):
    """Holds one pair's learnable scale (and shift); knows its modules by name within the block."""

    def __init__(self, spec: LETPairSpec) -> None:
        super().__init__()
        self.location, self.source, self.targets = spec.location, spec.source, list(spec.targets)
        self.expand_source, self.expand_target = spec.expand_source, spec.expand_target
        self.source_rows, self.positive = spec.source_rows, spec.positive
        self.scale = nn.Parameter(spec.scale_init.detach().float().clone())
        self.shift = None if spec.shift_init is None else nn.Parameter(spec.shift_init.detach().float().clone())
        self.min_scale = 0.0  # OmniQuant truncates |scale| at 1e-2 while training (the method sets it)

    def effective_scale(self) -> torch.Tensor:
        """The scale as applied: truncated to ``|s| >= min_scale`` (straight-through), so a half-precision
        forward never divides by a tiny scale; folding uses the same value, so the fold stays exact."""
        if self.positive:  # clamped (straight-through) so that it never changes sign
            return truncate_ste(self.scale.abs(), max(self.min_scale, MIN_SCALE))
        return truncate_ste(self.scale, self.min_scale)

    def apply(self, block: nn.Module) -> None:
        """Set the transformed tensors on the modules of ``block`` (``set_let``)."""
        scale = self.effective_scale()
        s_src, s_tgt = self.expand_source(scale), self.expand_target(scale)
        d_src = None if self.shift is None else self.expand_source(self.shift)
        d_tgt = None if self.shift is None else self.expand_target(self.shift)
        src = block.get_submodule(self.source)
        if self.location == "qk":  # q / s, k * s keeps every q.k product
            src.set_let(*scale_output_rows(*src.effective(), s_src))
            for name in self.targets:
                lin = block.get_submodule(name)
                lin.set_let(*scale_output_rows(*lin.effective(), 1.0 / s_tgt))
            return
        if self.location == "norm":
            src.set_let(s_src, d_src)
        else:  # vo, up_down: the source linear's output rows
            src.set_let(*scale_output_rows(*src.effective(), s_src, d_src, self.source_rows))
        for name in self.targets:
            lin = block.get_submodule(name)
            lin.set_let(*scale_input_columns(*lin.effective(), s_tgt, d_tgt))

    def extra_repr(self) -> str:
        trunc = f", |scale| >= {self.min_scale:g}" if self.min_scale else ""
        rows = f" rows {self.source_rows[0]}:{self.source_rows[1]}" if self.source_rows else ""
        return f"{self.location}: {self.source}{rows} -> {', '.join(self.targets)}, shift={self.shift is not None}{trunc}"
