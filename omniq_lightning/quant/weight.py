"""Grouped weight quantization in a :class:`WeightFormat`: fake quantization, integer codes, dequantization.

A ``[out, in]`` weight is viewed as groups (rows of ``group_size`` input columns, or whole output
channels). Each group gets a grid from its range ``[lo, hi]`` (LWC-clipped when logits are given):

* ``uniform``: ``x_hat = (q - zero) * scale`` with integer codes ``q`` (see :mod:`.functional`); an asymmetric
  group's range is widened to contain 0, so its zero point is itself one of the codes.
* ``power``: companding. With ``mid``/``half`` the centre and half-width of the range (symmetric:
  ``0``/``max|.|``), ``t = (x - mid) / half`` is mapped to ``c = sign(t) |t|^(1/p)``, rounded on the
  uniform grid of ``2^b`` points over ``[-1, 1]``, and decoded to ``x_hat = mid + half * sign(c') |c'|^p``.
  The levels are ``p``-th powers of a uniform grid: denser near the centre of the range for ``p > 1``.
  Gradients: straight-through to ``x`` in value space (1 inside the grid, 0 where clipped), and to the
  range through the decoder with the codes held fixed (``d x_hat / d half`` = the level).

A learned rounding offset (one per weight, in grid steps, kept in [-0.5, 0.5] by the trainer) is added
to the grid index before rounding. :func:`quantize_weight` returns the integer codes with the grid
(:class:`QuantizedWeight`); its :meth:`~QuantizedWeight.dequantize` reproduces :func:`reference_fake_quant_weight`
bit for bit, so exports never re-derive a grid from dequantized weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from omniq_lightning.quant.functional import (
    SCALE_EPS,
    check_floating,
    check_ranges,
    compute_dtype,
    fake_quant,
    grid,
    group_view,
    lwc_bounds,
    round_ste,
    row_ranges,
    scale_zero,
    validate_weight,
)
from omniq_lightning.quant.spec import WeightFormat

NO_CLIP_LOGIT = 30.0  # sigmoid(30) == 1.0 in float32: the full range


@dataclass
class GroupGrid:
    """Per-group grid parameters ``[n_groups, 1]``: uniform ``scale``/``zero``, or power ``half``/``mid``."""

    scale: torch.Tensor
    zero: torch.Tensor


def _logits_view(name: str, t: torch.Tensor | None, n_groups: int, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    if t.numel() != n_groups:
        raise ValueError(f"{name} must hold one logit per group ({n_groups}), got shape {tuple(t.shape)}")
    return t.reshape(n_groups, 1).to(dtype)


def group_grid(
    gx: torch.Tensor, fmt: WeightFormat, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
    ranges: str = "detached",
) -> GroupGrid:
    """The grid of each row of grouped weights ``gx`` (``[n_groups, group]``), LWC-clipped; differentiable in
    the logits (and, with ``ranges="released"``, in ``gx`` through its min and max)."""
    lo, hi = row_ranges(gx, ranges)
    if fmt.grid == "uniform" and not fmt.symmetric:
        # widened to hold 0 (as GPTQ does), so the zero point is always a code in 0..2^b-1: what packed formats store
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    lo, hi = lwc_bounds(lo, hi, _logits_view("gamma", gamma, gx.shape[0], gx.dtype),
                        _logits_view("beta", beta, gx.shape[0], gx.dtype))
    if fmt.grid == "uniform":
        return GroupGrid(*scale_zero(lo, hi, fmt.bits, fmt.symmetric, zero_grad=ranges == "detached"))
    if fmt.symmetric:
        half, mid = torch.maximum(hi.abs(), lo.abs()), torch.zeros_like(hi)
    else:
        half, mid = (hi - lo) * 0.5, (lo + hi) * 0.5
    return GroupGrid(torch.clamp(half, min=SCALE_EPS), mid)


def power_level(q: torch.Tensor, bits: int, exponent: float) -> torch.Tensor:
    """The normalised level ``sign(c)|c|^p`` in [-1, 1] of (float) code ``q``, ``c = 2q / (2^b - 1) - 1``."""
    c = q * (2.0 / (2**bits - 1)) - 1.0
    return torch.sign(c) * c.abs().pow(exponent)


def power_index(x: torch.Tensor, g: GroupGrid, fmt: WeightFormat) -> torch.Tensor:
    """Continuous grid index of ``x`` on the power grid (codes are its rounding, clamped to 0..2^b-1)."""
    t = (x - g.zero) / g.scale
    return (torch.sign(t) * t.abs().pow(1.0 / fmt.grid_exponent) + 1.0) * ((2**fmt.bits - 1) * 0.5)


def _power_fake_quant(gx: torch.Tensor, g: GroupGrid, fmt: WeightFormat, offset: torch.Tensor | None) -> torch.Tensor:
    u = power_index(gx.detach(), GroupGrid(g.scale.detach(), g.zero.detach()), fmt)
    r = round_ste(u if offset is None else u + offset)  # the offset's gradient goes through the decoder
    qmax = 2**fmt.bits - 1
    inside = ((r >= 0) & (r <= qmax)).to(gx.dtype)
    q = torch.clamp(r, 0, qmax)
    decoded = g.zero + g.scale * power_level(q, fmt.bits, fmt.grid_exponent)
    return decoded + (gx - gx.detach()) * inside  # straight-through to x in value space


def reference_fake_quant_weight(
    w: torch.Tensor,
    fmt: WeightFormat,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    ranges: str = "detached",
) -> torch.Tensor:
    """Fake-quantize a ``[out, in]`` weight in format ``fmt``, with optional LWC logits (one per group:
    ``[out, in / group_size]`` or ``[out, 1]``) and learned rounding offsets (``[out, in]``)."""
    check_floating("weight", w)
    check_ranges(ranges)
    gx = group_view(w, fmt.group_size).to(compute_dtype(w))
    off = None if offset is None else group_view(offset, fmt.group_size).to(gx.dtype)
    g = group_grid(gx, fmt, gamma, beta, ranges)
    if fmt.grid == "uniform":
        out = fake_quant(gx, g.scale, g.zero, fmt.bits, fmt.symmetric, off)
    else:
        out = _power_fake_quant(gx, g, fmt, off)
    return out.reshape(w.shape).to(w.dtype)


@dataclass
class QuantizedWeight:
    """A quantized weight as it is stored: unsigned integer codes and the grid of each group.

    ``codes``: uint8 ``[out, in]`` in ``0..2^b-1``. ``scale``/``zero``: float32 ``[out, n_groups]``; for the
    uniform grid ``x_hat = (codes - zero) * scale`` (a symmetric grid stores ``zero = 2^(b-1)``), for the
    power grid ``x_hat = zero + scale * level(codes)`` (``zero`` the midpoint, ``scale`` the half-width).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    fmt: WeightFormat

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight; equal, bit for bit, to the fake-quant weight it was taken from."""
        gq = group_view(self.codes, self.fmt.group_size).to(torch.float32)
        s, z = self.scale.reshape(-1, 1), self.zero.reshape(-1, 1)
        if self.fmt.grid == "uniform":
            y = (gq - z) * s
        else:
            y = z + s * power_level(gq, self.fmt.bits, self.fmt.grid_exponent)
        return y.reshape(self.codes.shape)

    def to(self, device) -> QuantizedWeight:
        return QuantizedWeight(self.codes.to(device), self.scale.to(device), self.zero.to(device), self.fmt)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.codes": self.codes, f"{prefix}.scale": self.scale, f"{prefix}.zero": self.zero}

    @classmethod
    def from_tensors(cls, t, prefix: str, fmt: WeightFormat) -> QuantizedWeight:
        """The inverse of :meth:`tensors`."""
        return cls(t[f"{prefix}.codes"], t[f"{prefix}.scale"], t[f"{prefix}.zero"], fmt)


def codes_on_grid(gx: torch.Tensor, g: GroupGrid, fmt: WeightFormat, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (as floats, unsigned ``0..2^b-1``) of grouped values ``gx`` on a fixed grid."""
    if fmt.grid == "uniform":
        qmin, qmax = grid(fmt.bits, fmt.symmetric)
        u = gx / g.scale if offset is None else gx / g.scale + offset
        q = torch.clamp(torch.round(u) + g.zero, qmin, qmax)
        return q - qmin  # unsigned
    u = power_index(gx, g, fmt)
    return torch.clamp(torch.round(u if offset is None else u + offset), 0, 2**fmt.bits - 1)


def round_to_grid(x: torch.Tensor, g: GroupGrid, fmt: WeightFormat) -> torch.Tensor:
    """Values ``x`` rounded to the nearest point of a fixed grid (the same arithmetic as fake quantization)."""
    if fmt.grid == "uniform":
        qmin, qmax = grid(fmt.bits, fmt.symmetric)
        return (torch.clamp(torch.round(x / g.scale) + g.zero, qmin, qmax) - g.zero) * g.scale
    q = torch.clamp(torch.round(power_index(x, g, fmt)), 0, 2**fmt.bits - 1)
    return g.zero + g.scale * power_level(q, fmt.bits, fmt.grid_exponent)


def codes_of(w_hat: torch.Tensor, g: GroupGrid, fmt: WeightFormat) -> QuantizedWeight:
    """The codes of a weight already on grid ``g`` (e.g. GPTQ's result): exact, and checked to be."""
    gx = group_view(w_hat, fmt.group_size).to(g.scale.dtype)
    q = QuantizedWeight(codes_on_grid(gx, g, fmt).reshape(w_hat.shape).to(torch.uint8),
                        g.scale.reshape(w_hat.shape[0], -1).float(),
                        stored_zero(g, fmt).reshape(w_hat.shape[0], -1).float(), fmt)
    if not torch.equal(q.dequantize(), w_hat.float()):
        raise ValueError("the weight is not on the given grid: its codes cannot be recovered exactly")
    return q


def stored_zero(g: GroupGrid, fmt: WeightFormat) -> torch.Tensor:
    """The zero point as stored beside unsigned codes (symmetric uniform grids: ``2^(b-1)``)."""
    if fmt.grid == "uniform" and fmt.symmetric:
        return torch.full_like(g.zero, float(2 ** (fmt.bits - 1)))
    return g.zero


@torch.no_grad()
def quantize_weight(
    w: torch.Tensor,
    fmt: WeightFormat,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Codes and grid of ``w`` (what :func:`reference_fake_quant_weight` computes, kept as integers)."""
    validate_weight(w, fmt.group_size)
    gx = group_view(w, fmt.group_size).to(compute_dtype(w))
    g = group_grid(gx, fmt, gamma, beta)
    off = None if offset is None else group_view(offset, fmt.group_size).to(gx.dtype)
    codes = codes_on_grid(gx, g, fmt, off)
    out = w.shape[0]
    return QuantizedWeight(codes.reshape(w.shape).to(torch.uint8), g.scale.reshape(out, -1).float(),
                           stored_zero(g, fmt).reshape(out, -1).float(), fmt)


def grid_of(w: torch.Tensor, fmt: WeightFormat, gamma: torch.Tensor | None = None,
            beta: torch.Tensor | None = None) -> GroupGrid:
    """The (detached) grid of every group of ``w``: ``[n_groups, 1]`` tensors in row-major group order."""
    validate_weight(w, fmt.group_size)
    with torch.no_grad():
        return group_grid(group_view(w, fmt.group_size).to(compute_dtype(w)), fmt, gamma, beta)


@torch.no_grad()
def mse_clip_logits(w: torch.Tensor, fmt: WeightFormat, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
    """Per group, the LWC logit of the clip ratio (on a grid from 1 down to ``1 - max_shrink``) that minimises
    the group's squared weight error ``||Q(w) - w||^2``: a cheap, data-free start for learned clipping.
    Returns ``[out, n_groups]`` logits (the same for both bounds)."""
    out = w.shape[0]
    gx = group_view(w, fmt.group_size).to(compute_dtype(w))
    best_err = torch.full((gx.shape[0], 1), float("inf"), device=w.device, dtype=gx.dtype)
    best = torch.empty_like(best_err)
    for i in range(n_grid + 1):
        r = 1.0 - max_shrink * i / n_grid
        lg = torch.full((gx.shape[0],), clip_logit(r), device=w.device, dtype=gx.dtype)
        err = (reference_fake_quant_weight(gx, WeightFormat(fmt.bits, None, fmt.symmetric, fmt.grid, fmt.grid_exponent), lg, lg)
               - gx).pow(2).sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, lg[:, None], best)
    return best.reshape(out, -1).float()


def clip_logit(ratio: float) -> float:
    """The LWC logit whose sigmoid is clip ratio ``ratio``; 1.0 and above: the full range (``NO_CLIP_LOGIT``)."""
    if ratio >= 1.0:
        return NO_CLIP_LOGIT
    r = min(max(ratio, 1e-4), 1 - 1e-4)
    return math.log(r / (1 - r))
