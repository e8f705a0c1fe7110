"""The fused CUDA kernels against the pure-PyTorch reference (skipped without a CUDA device).

The reference and the kernels compute the scale the same way (``range * (1 / qmax)``), so their outputs
and straight-through gradients agree to the rounding of the output format; per-group sums (the LWC logit
gradients, and the range gradients of the "released" convention) differ only by fp32 summation order and
are compared against the sum of the magnitudes of their terms, tight enough that a sign flip fails.
"""

from __future__ import annotations

import pytest
import torch

from omniq_lightning.quant import WeightFormat
from omniq_lightning.quant import functional as F
from omniq_lightning.quant import weight as W
from omniq_lightning.quant.cuda import load_extension
from omniq_lightning.quant.ops import fake_quant_per_token, fake_quant_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Relative tolerance of each format's rounding (fp32 compute, result rounded to the format).
FORMAT_RTOL = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}
SUM_RTOL = 5e-4  # fp32 sums in another order, relative to the sum of magnitudes of their terms


@pytest.fixture(scope="module")
def ext():
    mod = load_extension()
    if mod is None:
        pytest.fail("CUDA is available but the fused extension did not load (see the log line above)")
    return mod


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float, mask: torch.Tensor | None = None) -> None:
    """|a - b| <= rtol * (|b| + max|b| * 1e-3): relative, with a floor for entries near zero."""
    a, b = a.double(), b.double()
    floor = b.abs().max().clamp(min=1e-30) * 1e-3
    bad = (a - b).abs() > rtol * (b.abs() + floor)
    if mask is not None:
        bad &= mask
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} entries differ; max diff {(a - b).abs().max().item():.3e}"


def sums_close(a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> None:
    """Per-row sums: |a - b| <= SUM_RTOL * (sum of |terms|) (+ a floor); a sign flip of a sum fails this."""
    tol = SUM_RTOL * magnitude.double() + 1e-7 * magnitude.double().max()
    bad = (a.double() - b.double()).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} sums differ; max diff {(a - b).abs().max().item():.3e}"
    sign_flip = (a.sign() != b.sign()) & (b.abs() > 2 * tol)
    assert not sign_flip.any()


def weight_case(shape, group, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(shape, generator=gen, device="cuda") * 0.05).to(dtype)
    n = shape[0] * shape[1] // (group or shape[1])
    gamma = torch.empty(n, device="cuda").uniform_(-1, 5, generator=gen)
    beta = torch.empty(n, device="cuda").uniform_(-1, 5, generator=gen)
    dy = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    return w, gamma, beta, dy


def run_weight(w, gamma, beta, dy, f, ranges, fused):
    w = w.clone().requires_grad_(True)
    g = gamma.clone().requires_grad_(True)
    b = beta.clone().requires_grad_(True)
    fn = fake_quant_weight if fused else W.reference_fake_quant_weight
    y = fn(w, f, g, b, None, ranges)
    y.backward(dy)
    return y.detach(), w.grad, g.grad, b.grad


def logit_magnitudes(w, gamma, beta, dy, group):
    """Upper bounds of the sums of |terms| of the gamma and beta gradients: |d w_hat / d bound| <= 2 per element."""
    gw = w.float().reshape(-1, group or w.shape[1])
    s = dy.float().abs().reshape(gw.shape).sum(1) * 2
    sg, sb = torch.sigmoid(gamma), torch.sigmoid(beta)
    return s * sg * (1 - sg) * gw.amax(1).abs(), s * sb * (1 - sb) * gw.amin(1).abs()


@pytest.mark.parametrize("shape,group", [((64, 256), 128), ((37, 192), 64), ((96, 4096), None), ((5, 33), None)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ranges", ["detached", "released"])
def test_fused_weight_fake_quant_matches_reference(ext, shape, group, bits, symmetric, dtype, ranges):
    f = WeightFormat(bits, group, symmetric)
    w, gamma, beta, dy = weight_case(shape, group, dtype, seed=bits + shape[0])
    y_f, gw_f, gg_f, gb_f = run_weight(w, gamma, beta, dy, f, ranges, fused=True)
    y_r, gw_r, gg_r, gb_r = run_weight(w, gamma, beta, dy, f, ranges, fused=False)
    rtol = FORMAT_RTOL[dtype]
    rel_close(y_f, y_r, rtol)
    groups = w.float().reshape(-1, group or shape[1])
    extremes = (groups == groups.amax(1, keepdim=True)) | (groups == groups.amin(1, keepdim=True))
    rel_close(gw_f, gw_r, rtol, mask=~extremes.reshape(shape))  # straight-through part
    if ranges == "released":  # the range gradient lands on the extremes: per-group sums of terms below 2|dy|
        terms = 2 * dy.float().abs().reshape(groups.shape).sum(1) * (torch.sigmoid(gamma) + torch.sigmoid(beta))
        diff = (gw_f.float() - gw_r.float()).reshape(groups.shape)[extremes].abs()
        bound = SUM_RTOL * terms[:, None].expand_as(groups)[extremes] + rtol * gw_r.float().abs().max()
        assert (diff <= bound).all()
    mg, mb = logit_magnitudes(w, gamma, beta, dy, group)
    sums_close(gg_f, gg_r, mg)
    sums_close(gb_f, gb_r, mb)


@pytest.mark.parametrize("shape", [(2048, 4096), (7, 129), (3, 5, 64)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ranges", ["detached", "released"])
def test_fused_per_token_matches_reference(ext, shape, bits, symmetric, dtype, ranges):
    gen = torch.Generator(device="cuda").manual_seed(bits)
    x = (torch.randn(shape, generator=gen, device="cuda") * 4).to(dtype)
    dy = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    xf = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    yf = fake_quant_per_token(xf, bits, symmetric, ranges)
    yr = F.reference_fake_quant_per_token(xr, bits, symmetric, ranges)
    yf.backward(dy)
    yr.backward(dy)
    rel_close(yf.detach(), yr.detach(), FORMAT_RTOL[dtype])
    rows = x.float().reshape(-1, shape[-1])
    extremes = ((rows == rows.amax(1, keepdim=True)) | (rows == rows.amin(1, keepdim=True))).reshape(shape)
    rel_close(xf.grad, xr.grad, FORMAT_RTOL[dtype], mask=~extremes if ranges == "released" else None)
    if ranges == "released":
        magnitude = dy.float().abs().reshape(rows.shape).sum(1, keepdim=True).expand_as(rows).reshape(shape)
        diff = (xf.grad.float() - xr.grad.float()).abs()[extremes]
        assert (diff <= SUM_RTOL * magnitude[extremes] + FORMAT_RTOL[dtype] * xr.grad.float().abs().max()).all()


def test_scale_is_bit_identical_between_kernel_and_reference(ext):
    """One ulp of difference in a scale flips roundings by a whole step: the paths must agree exactly."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 4096, generator=gen, device="cuda")
    for bits in (3, 4, 8):
        f = WeightFormat(bits, 128)
        assert torch.equal(fake_quant_weight(w, f), W.reference_fake_quant_weight(w, f))
        assert torch.equal(fake_quant_per_token(w, bits), F.reference_fake_quant_per_token(w, bits))


def test_disable_env_forces_reference(monkeypatch):
    from omniq_lightning.quant import cuda

    monkeypatch.setenv("OMNIQ_DISABLE_CUDA_EXT", "1")
    cuda.load_extension.cache_clear()
    try:
        assert cuda.load_extension() is None
    finally:
        monkeypatch.delenv("OMNIQ_DISABLE_CUDA_EXT")
        cuda.load_extension.cache_clear()
