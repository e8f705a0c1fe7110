"""Uniform affine fake quantization and activation quantizers: the pure-PyTorch reference.

Every function here is a pure function of tensors. Gradients follow the straight-through estimator:
rounding passes gradients through unchanged (``RoundSTE``), clamping to the integer grid stops them.
This module (with :mod:`omniq_lightning.quant.weight` for grouped weights) is the numerical reference
that the fused CUDA kernels in ``cuda_ext/`` must match.

Conventions shared with the kernels (and documented in the README):

* Arithmetic runs in float32 (float64 when the input is float64); the result is cast back to the
  input dtype.
* Asymmetric grid: integers ``0..2^b-1``; ``scale = (hi - lo) * (1 / (2^b - 1))`` clamped below at
  ``SCALE_EPS``; ``zero = round(-lo / scale)``; ``x_hat = (clamp(round(x / scale) + zero) - zero) * scale``.
* Symmetric grid: integers ``-2^(b-1)..2^(b-1)-1``; ``scale = max(|hi|, |lo|) * (1 / (2^(b-1) - 1))``.
* Ranges (``lo``, ``hi``) are the min and max of each group (or token). Two gradient conventions
  (``RANGES``):
  - ``"detached"`` (default): ranges of the *detached* input, so the gradient to the input is purely
    straight-through (1 inside the grid, 0 where clamped); the zero point passes gradients straight
    through its rounding, so LWC logits get the exact gradient of the fake-quant output.
  - ``"released"`` (as the released OmniQuant code): min and max are not detached, so the input also
    gets the gradient of its range (the element holding a group's min or max, ties sharing it), which
    is how LET learns from the step size its scales produce; the zero point is rounded without a
    gradient.
"""

from __future__ import annotations

import torch

SCALE_EPS = 1e-5
RANGES = ("detached", "released")


class RoundSTE(torch.autograd.Function):
    """Round half to even in the forward pass; identity gradient in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return RoundSTE.apply(x)


class TruncateSTE(torch.autograd.Function):
    """``sign(x) * max(|x|, t)`` (sign(0) taken as +1) with an identity gradient: OmniQuant's LET scale truncation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, threshold: float) -> torch.Tensor:  # noqa: D102
        sign = torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))
        return torch.where(x.abs() < threshold, sign * threshold, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def truncate_ste(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep ``|x| >= threshold`` (straight-through), so dividing by ``x`` never overflows a half-precision step."""
    return TruncateSTE.apply(x, threshold) if threshold > 0 else x


def check_ranges(ranges: str) -> str:
    if ranges not in RANGES:
        raise ValueError(f"ranges must be one of {RANGES} (method.ranges), got {ranges!r}")
    return ranges


def grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit grid."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_floating(name: str, x: torch.Tensor, finite: bool = False) -> None:
    if not torch.is_floating_point(x):
        raise ValueError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), got {x.dtype}")
    if finite and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values; fix or drop the offending weights before quantizing")


def validate_weight(w: torch.Tensor, group_size: int | None = None) -> None:
    """Check a weight before quantization: 2-D, floating point, finite, group size dividing its width.

    Run once per layer (e.g. when a layer is wrapped), not on every forward: it synchronizes the device.
    """
    check_floating("weight", w, finite=True)
    group_view(w, group_size)


def group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View a ``[out, in]`` weight as ``[out * in / group_size, group_size]`` (per-channel: ``[out, in]``)."""
    if w.dim() != 2:
        raise ValueError(f"weights must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if group_size is None:
        return w
    if w.shape[1] % group_size != 0:
        raise ValueError(
            f"w_group_size={group_size} does not divide the input width {w.shape[1]}: choose a group size that "
            "divides it, or null for per-channel"
        )
    return w.reshape(-1, group_size)


def row_ranges(x: torch.Tensor, ranges: str = "detached") -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over the last dimension (keepdim), detached or differentiable per the ``ranges`` convention."""
    src = x if check_ranges(ranges) == "released" else x.detach()
    return src.amin(dim=-1, keepdim=True), src.amax(dim=-1, keepdim=True)


def scale_zero(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, zero_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the grid covering ``[lo, hi]``; the zero point's rounding is straight-through
    (``zero_grad``) or has no gradient (the released OmniQuant convention)."""
    # range * (1 / qmax), written as a multiply: ATen's CUDA division by a scalar is exactly this, its CPU
    # division is not, and the kernels do the same, so every path gets the same scale bit for bit.
    if symmetric:
        absmax = torch.maximum(hi.abs(), lo.abs())
        scale = torch.clamp(absmax * (1.0 / (2 ** (bits - 1) - 1)), min=SCALE_EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) * (1.0 / (2**bits - 1)), min=SCALE_EPS)
    zero = -lo / scale
    return scale, (round_ste(zero) if zero_grad else torch.round(zero).detach())


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid given by ``scale`` and ``zero`` (broadcast along the last dim);
    ``offset`` (learned rounding, in grid steps) is added before rounding."""
    qmin, qmax = grid(bits, symmetric)
    u = x / scale if offset is None else x / scale + offset
    q = torch.clamp(round_ste(u) + zero, qmin, qmax)
    return (q - zero) * scale


def lwc_bounds(
    lo: torch.Tensor, hi: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable Weight Clipping: ``(sigmoid(beta) * lo, sigmoid(gamma) * hi)``; identity without logits."""
    if gamma is not None:
        hi = torch.sigmoid(gamma) * hi
    if beta is not None:
        lo = torch.sigmoid(beta) * lo
    return lo, hi


def reference_fake_quant_per_token(x: torch.Tensor, bits: int, symmetric: bool = False, ranges: str = "detached",
                                   clip: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic per-token fake quantization: one range per row of the last dimension (see ``RANGES``); ``clip``:
    learnable activation clipping logits ``[gamma, beta]`` (each token's range ``[sigmoid(beta) min,
    sigmoid(gamma) max]``, the logits getting the gradient through the scale and zero point)."""
    check_floating("activation", x)
    xx = x.to(compute_dtype(x))
    lo, hi = row_ranges(xx, ranges)
    if clip is not None:
        lo, hi = lwc_bounds(lo, hi, clip[0].to(xx.dtype), clip[1].to(xx.dtype))
        scale, zero = scale_zero(lo, hi, bits, symmetric, zero_grad=ranges == "detached")
        return fake_quant(xx, scale, zero, bits, symmetric).to(x.dtype)
    if ranges == "released":
        scale, zero = scale_zero(lo, hi, bits, symmetric, zero_grad=False)
    else:
        scale, zero = (t.detach() for t in scale_zero(lo, hi, bits, symmetric))
    return fake_quant(xx, scale, zero, bits, symmetric).to(x.dtype)


def fake_quant_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool = False
) -> torch.Tensor:
    """Static per-tensor fake quantization with a calibrated ``scale`` and ``zero`` (scalars)."""
    check_floating("activation", x)
    dt = compute_dtype(x)
    return fake_quant(x.to(dt), scale.to(dt), zero.to(dt), bits, symmetric).to(x.dtype)


def tensor_range_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Static scale and zero point from an observed range (for per-tensor activations)."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    scale, zero = scale_zero(lo, hi, bits, symmetric)
    return scale.detach(), zero.detach()
