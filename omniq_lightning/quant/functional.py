"""Uniform affine fake quantization: the pure-PyTorch reference.

Every function here is a pure function of tensors. Gradients follow the straight-through estimator:
rounding passes gradients through unchanged (``RoundSTE``), clamping to the integer grid stops them.
This module is the numerical reference that the fused CUDA kernels in ``cuda_ext/`` must match.

Conventions shared with the kernels (and documented in the README):

* Arithmetic runs in float32 (float64 when the input is float64); the result is cast back to the
  input dtype.
* Asymmetric grid: integers ``0..2^b-1``; ``scale = (hi - lo) / (2^b - 1)`` clamped below at
  ``SCALE_EPS``; ``zero = round(-lo / scale)``; ``x_hat = (clamp(round(x / scale) + zero) - zero) * scale``.
* Symmetric grid: integers ``-2^(b-1)..2^(b-1)-1``; ``scale = max(|hi|, |lo|) / (2^(b-1) - 1)``.
* Ranges (``lo``, ``hi``) are the min and max of each group (or token) of the *detached* input, so
  the gradient to the input is purely straight-through (1 inside the grid, 0 where clamped). With
  Learnable Weight Clipping, ``hi = sigmoid(gamma) * max`` and ``lo = sigmoid(beta) * min``, and the
  clipping logits receive the exact gradient of this expression.
"""

from __future__ import annotations

import torch

SCALE_EPS = 1e-5


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


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (rounded, straight-through) zero point of the grid covering ``[lo, hi]``."""
    if symmetric:
        absmax = torch.maximum(hi.abs(), lo.abs())
        scale = torch.clamp(absmax / (2 ** (bits - 1) - 1), min=SCALE_EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=SCALE_EPS)
    return scale, round_ste(-lo / scale)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid given by ``scale`` and ``zero`` (broadcast along the last dim)."""
    qmin, qmax = grid(bits, symmetric)
    q = torch.clamp(round_ste(x / scale) + zero, qmin, qmax)
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


def _logits_view(name: str, t: torch.Tensor | None, n_groups: int) -> torch.Tensor | None:
    if t is None:
        return None
    if t.numel() != n_groups:
        raise ValueError(f"{name} must hold one logit per group ({n_groups}), got shape {tuple(t.shape)}")
    return t.reshape(n_groups, 1)


def fake_quant_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake-quantize a ``[out, in]`` weight per output channel or per group, with optional LWC logits.

    ``gamma`` and ``beta`` hold one logit per group: shape ``[out, in / group_size]`` (or ``[out, 1]``).
    """
    check_floating("weight", w)
    gx = group_view(w, group_size).to(compute_dtype(w))
    scale, zero = _group_grid(gx, bits, symmetric, gamma, beta)
    return fake_quant(gx, scale, zero, bits, symmetric).reshape(w.shape).to(w.dtype)


def _group_grid(gx: torch.Tensor, bits: int, symmetric: bool, gamma: torch.Tensor | None, beta: torch.Tensor | None):
    """Scale and zero point per row of grouped weights ``gx``: ranges of the detached values, LWC-clipped
    (differentiable in the logits)."""
    detached = gx.detach()
    lo, hi = detached.amin(dim=1, keepdim=True), detached.amax(dim=1, keepdim=True)
    gam = _logits_view("gamma", gamma, gx.shape[0])
    bet = _logits_view("beta", beta, gx.shape[0])
    lo, hi = lwc_bounds(lo, hi, None if gam is None else gam.to(gx.dtype), None if bet is None else bet.to(gx.dtype))
    return scale_zero(lo, hi, bits, symmetric)


def fake_quant_per_token(x: torch.Tensor, bits: int, symmetric: bool = False) -> torch.Tensor:
    """Dynamic per-token fake quantization: one range per row of the last dimension (straight-through)."""
    check_floating("activation", x)
    dt = compute_dtype(x)
    xx = x.to(dt)
    detached = xx.detach()
    lo, hi = detached.amin(dim=-1, keepdim=True), detached.amax(dim=-1, keepdim=True)
    scale, zero = scale_zero(lo, hi, bits, symmetric)
    return fake_quant(xx, scale.detach(), zero.detach(), bits, symmetric).to(x.dtype)


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


def weight_scale_zero(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points ``[n_groups, 1]`` (groups in row-major order) of a weight's grid, LWC included."""
    validate_weight(w, group_size)
    with torch.no_grad():
        return _group_grid(group_view(w, group_size).to(compute_dtype(w)), bits, symmetric, gamma, beta)


def quantize_weight_int(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = False,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes ``[out, in]`` (int32), scales and zero points ``[n_groups, 1]`` of a weight.

    ``(codes - zero) * scale`` per group reproduces :func:`fake_quant_weight` exactly.
    """
    scale, zero = weight_scale_zero(w, bits, group_size, symmetric, gamma, beta)
    with torch.no_grad():
        g = group_view(w, group_size).to(scale.dtype)
        qmin, qmax = grid(bits, symmetric)
        codes = torch.clamp(torch.round(g / scale) + zero, qmin, qmax)
    return codes.reshape(w.shape).to(torch.int32), scale, zero
