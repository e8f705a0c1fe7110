"""Public fake-quant entry points: the fused CUDA kernels on CUDA tensors, the reference elsewhere.

The kernels cover the uniform grid with LWC (both range conventions) and per-token activations; the
power grid and learned rounding offsets always run the reference. The ``torch.autograd.Function``
classes here wrap the kernels; the reference in :mod:`.functional` / :mod:`.weight` gets the same
gradients through ``RoundSTE`` and autograd.
"""

from __future__ import annotations

import torch

from omniq_lightning.quant import functional as F
from omniq_lightning.quant import weight as W
from omniq_lightning.quant.cuda import usable_for
from omniq_lightning.quant.spec import WeightFormat


class FusedWeightFakeQuant(torch.autograd.Function):
    """Weight fake-quant with LWC on a contiguous ``[groups, group_size]`` CUDA matrix."""

    @staticmethod
    def forward(ctx, w2d, gamma, beta, bits, symmetric, released, ext):  # noqa: D102
        ctx.save_for_backward(w2d, gamma, beta)
        ctx.bits, ctx.symmetric, ctx.released, ctx.ext = bits, symmetric, released, ext
        return ext.weight_forward(w2d, gamma, beta, bits, symmetric)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        w2d, gamma, beta = ctx.saved_tensors
        grad_w, grad_gamma, grad_beta = ctx.ext.weight_backward(
            grad.contiguous(), w2d, gamma, beta, ctx.bits, ctx.symmetric, ctx.released
        )
        return (
            grad_w if ctx.needs_input_grad[0] else None,
            grad_gamma if gamma is not None and ctx.needs_input_grad[1] else None,
            grad_beta if beta is not None and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


class FusedTokenFakeQuant(torch.autograd.Function):
    """Dynamic per-token fake-quant of a contiguous ``[tokens, features]`` CUDA matrix."""

    @staticmethod
    def forward(ctx, x2d, bits, symmetric, released, ext):  # noqa: D102
        ctx.save_for_backward(x2d)
        ctx.bits, ctx.symmetric, ctx.released, ctx.ext = bits, symmetric, released, ext
        return ext.token_forward(x2d, bits, symmetric)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (x2d,) = ctx.saved_tensors
        grad_x = ctx.ext.token_backward(grad.contiguous(), x2d, ctx.bits, ctx.symmetric, ctx.released)
        return grad_x, None, None, None, None


def _fp32_logits(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).float().contiguous()


def fake_quant_weight(
    w: torch.Tensor,
    fmt: WeightFormat,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    ranges: str = "detached",
    use_cuda_ext: bool = True,
) -> torch.Tensor:
    """Fake-quantize a ``[out, in]`` weight (see :func:`weight.reference_fake_quant_weight`), fused on CUDA where it can."""
    ext = usable_for(w) if use_cuda_ext and fmt.grid == "uniform" and offset is None else None
    if ext is None:
        return W.reference_fake_quant_weight(w, fmt, gamma, beta, offset, ranges)
    F.check_ranges(ranges)
    w2d = F.group_view(w, fmt.group_size).contiguous()
    for name, t in (("gamma", gamma), ("beta", beta)):
        if t is not None and t.numel() != w2d.shape[0]:
            raise ValueError(f"{name} must hold one logit per group ({w2d.shape[0]}), got shape {tuple(t.shape)}")
    g, b = _fp32_logits(gamma), _fp32_logits(beta)
    out = FusedWeightFakeQuant.apply(w2d, g, b, fmt.bits, fmt.symmetric, ranges == "released", ext)
    return out.reshape(w.shape)


def fake_quant_per_token(x: torch.Tensor, bits: int, symmetric: bool = False, ranges: str = "detached",
                         use_cuda_ext: bool = True, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic per-token fake-quant (see :func:`functional.reference_fake_quant_per_token`), fused on CUDA (the
    kernels have no activation clipping: with ``clip`` the reference runs)."""
    ext = usable_for(x) if use_cuda_ext and clip is None else None
    if ext is None or x.numel() == 0:
        return F.reference_fake_quant_per_token(x, bits, symmetric, ranges, clip)
    F.check_ranges(ranges)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    return FusedTokenFakeQuant.apply(x2d, bits, symmetric, ranges == "released", ext).reshape(x.shape)
