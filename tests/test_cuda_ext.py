"""The fused CUDA kernels against the pure-PyTorch reference (skipped without a CUDA device)."""

from __future__ import annotations

import pytest
import torch

from omniq_lightning.quant import functional as F
from omniq_lightning.quant.cuda import load_extension
from omniq_lightning.quant.ops import fake_quant_per_token, fake_quant_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Relative tolerance of each format's rounding (fp32 compute, result rounded to the format).
FORMAT_RTOL = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}


@pytest.fixture(scope="module")
def ext():
    mod = load_extension()
    if mod is None:
        pytest.fail("CUDA is available but the fused extension did not load (see the log line above)")
    return mod


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """|a - b| <= rtol * (|b| + max|b| * 1e-3): relative, with a floor for entries near zero."""
    a, b = a.double(), b.double()
    floor = b.abs().max().clamp(min=1e-30) * 1e-3
    bad = (a - b).abs() > rtol * (b.abs() + floor)
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} entries differ; max diff {(a - b).abs().max().item():.3e}"


def weight_case(shape, group, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(shape, generator=gen, device="cuda") * 0.05).to(dtype)
    n = shape[0] * shape[1] // (group or shape[1])
    gamma = torch.empty(n, device="cuda").uniform_(-1, 5, generator=gen)
    beta = torch.empty(n, device="cuda").uniform_(-1, 5, generator=gen)
    dy = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    return w, gamma, beta, dy


def run_weight(w, gamma, beta, dy, bits, group, symmetric, fused):
    w = w.clone().requires_grad_(True)
    g = gamma.clone().requires_grad_(True)
    b = beta.clone().requires_grad_(True)
    if fused:
        y = fake_quant_weight(w, bits, group, symmetric, g, b)
    else:
        y = F.fake_quant_weight(w, bits, group, symmetric, g, b)
    y.backward(dy)
    return y.detach(), w.grad, g.grad, b.grad


@pytest.mark.parametrize("shape,group", [((64, 256), 128), ((37, 192), 64), ((96, 4096), None), ((5, 33), None)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_weight_fake_quant_matches_reference(ext, shape, group, bits, symmetric, dtype):
    w, gamma, beta, dy = weight_case(shape, group, dtype, seed=bits + shape[0])
    y_f, gw_f, gg_f, gb_f = run_weight(w, gamma, beta, dy, bits, group, symmetric, fused=True)
    y_r, gw_r, gg_r, gb_r = run_weight(w, gamma, beta, dy, bits, group, symmetric, fused=False)
    rtol = FORMAT_RTOL[dtype]
    rel_close(y_f, y_r, rtol)
    rel_close(gw_f, gw_r, rtol)
    # per-group sums: fp32 accumulation in another order; relative to the sum of magnitudes
    rel_close(gg_f, gg_r, max(rtol, 1e-6) * shape[1])
    rel_close(gb_f, gb_r, max(rtol, 1e-6) * shape[1])


@pytest.mark.parametrize("shape", [(2048, 4096), (7, 129), (3, 5, 64)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_per_token_matches_reference(ext, shape, bits, symmetric, dtype):
    gen = torch.Generator(device="cuda").manual_seed(bits)
    x = (torch.randn(shape, generator=gen, device="cuda") * 4).to(dtype)
    dy = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    xf = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    yf = fake_quant_per_token(xf, bits, symmetric)
    yr = F.fake_quant_per_token(xr, bits, symmetric)
    yf.backward(dy)
    yr.backward(dy)
    rel_close(yf.detach(), yr.detach(), FORMAT_RTOL[dtype])
    rel_close(xf.grad, xr.grad, FORMAT_RTOL[dtype])


def test_disable_env_forces_reference(monkeypatch):
    from omniq_lightning.quant import cuda

    monkeypatch.setenv("OMNIQ_DISABLE_CUDA_EXT", "1")
    cuda.load_extension.cache_clear()
    try:
        assert cuda.load_extension() is None
    finally:
        monkeypatch.delenv("OMNIQ_DISABLE_CUDA_EXT")
        cuda.load_extension.cache_clear()
