"""Quantizers and their gradients against the independent float64 reference, plus grid properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from omniq_lightning.quant import (
    QuantSpec,
    fake_quant,
    fake_quant_per_tensor,
    fake_quant_per_token,
    fake_quant_weight,
    grid,
    quantize_weight_int,
    scale_zero,
    tensor_range_params,
    validate_weight,
)
from tests import quant_reference as ref

SHAPES_GROUPS = [
    ((7, 64), 64),
    ((7, 64), None),
    ((13, 192), 64),
    ((5, 256), 128),
    ((3, 37), None),
    ((31, 256), None),
    ((2, 384), 128),
]
BITS = [2, 3, 4, 8]


def assert_straight_through(grad, grad_ref):
    """Same zero pattern exactly; values equal up to the rounding of (dy * s) / s in autograd."""
    np.testing.assert_array_equal(grad == 0, grad_ref == 0)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-14, atol=0)


def make_case(shape, group, seed, lwc):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64) * torch.rand(shape[0], 1, generator=gen, dtype=torch.float64)
    w[0, 0] += 4.0  # an outlier
    n_groups = shape[0] * (shape[1] // (group or shape[1]))
    if not lwc:
        return w, None, None
    # logits spread from strong clipping (-1) to almost none (5)
    gamma = torch.empty(n_groups, dtype=torch.float64).uniform_(-1, 5, generator=gen)
    beta = torch.empty(n_groups, dtype=torch.float64).uniform_(-1, 5, generator=gen)
    return w, gamma, beta


@pytest.mark.parametrize("shape,group", SHAPES_GROUPS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("lwc", [False, True])
def test_weight_fake_quant_and_gradients_match_float64_reference(shape, group, bits, symmetric, lwc):
    w, gamma, beta = make_case(shape, group, seed=bits * 31 + shape[1], lwc=lwc)
    w = w.clone().requires_grad_(True)
    if lwc:
        gamma.requires_grad_(True)
        beta.requires_grad_(True)
    y = fake_quant_weight(w, bits, group, symmetric, gamma, beta)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (y * dy).sum().backward()

    y_ref, gw_ref, gg_ref, gb_ref = ref.weight_fake_quant(
        w.detach().numpy(), bits, group, symmetric,
        None if gamma is None else gamma.detach().numpy(),
        None if beta is None else beta.detach().numpy(),
        grad_out=dy.numpy(),
    )
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
    assert_straight_through(w.grad.numpy(), gw_ref)
    if lwc:
        np.testing.assert_allclose(gamma.grad.numpy(), gg_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(beta.grad.numpy(), gb_ref, rtol=1e-9, atol=1e-12)
        assert np.abs(gg_ref).sum() > 0 and np.abs(gb_ref).sum() + np.abs(gg_ref).sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_low_precision_weights_agree_with_reference_to_one_step(dtype, bits):
    """fp32 arithmetic on low-precision inputs may flip a value lying on a rounding tie, nothing more."""
    w, gamma, beta = make_case((16, 256), 64, seed=bits, lwc=True)
    w_lp = w.to(dtype)
    y = fake_quant_weight(w_lp, bits, 64, False, gamma.float(), beta.float())
    assert y.dtype == dtype
    y_ref = ref.weight_fake_quant(w_lp.double().numpy(), bits, 64, False, gamma.numpy(), beta.numpy())
    step = (w.abs().max() * 2 / (2**bits - 1)).item()
    diff = np.abs(y.double().numpy() - y_ref)
    fmt_tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * np.abs(y_ref).max()
    assert (diff > fmt_tol).mean() < 2e-3
    assert diff.max() <= step * 1.01 + fmt_tol


@pytest.mark.parametrize("shape", [(1, 8), (5, 64), (3, 7, 129), (2, 4, 1000)])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_token_fake_quant_and_gradient_match_float64_reference(shape, bits, symmetric):
    gen = torch.Generator().manual_seed(bits + len(shape))
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    y = fake_quant_per_token(x, bits, symmetric)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    (y * dy).sum().backward()
    y_ref, gx_ref = ref.token_fake_quant(x.detach().numpy(), bits, symmetric, grad_out=dy.numpy())
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
    assert_straight_through(x.grad.numpy(), gx_ref)


def test_per_tensor_static_fake_quant_is_straight_through_inside_and_zero_outside():
    x = torch.linspace(-3, 3, 101, dtype=torch.float64, requires_grad=True)
    scale, zero = tensor_range_params(torch.tensor(-1.0), torch.tensor(2.0), 4, False)
    y = fake_quant_per_tensor(x, scale, zero, 4, False)
    y.sum().backward()
    s, z = scale.double().item(), zero.double().item()
    expect = (np.clip(np.round(x.detach().numpy() / s) + z, 0, 15) - z) * s
    np.testing.assert_allclose(y.detach().numpy(), expect, rtol=0, atol=1e-12)
    t = np.round(x.detach().numpy() / s) + z
    np.testing.assert_array_equal(x.grad.numpy(), ((t >= 0) & (t <= 15)).astype(np.float64))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 4),
    group=st.sampled_from([8, 16, 33]),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    spread=st.floats(1e-3, 1e3),
)
def test_grid_properties(rows, groups, group, bits, symmetric, seed, spread):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * group, generator=gen, dtype=torch.float64) * spread
    y = fake_quant_weight(w, bits, group, symmetric)
    codes, scale, zero = quantize_weight_int(w, bits, group, symmetric)
    qmin, qmax = grid(bits, symmetric)
    # values are on the grid: integer codes in range that reproduce the fake-quant output
    assert codes.min() >= qmin and codes.max() <= qmax
    dequant = ((codes.double().reshape(-1, group) - zero) * scale).reshape(w.shape)
    torch.testing.assert_close(dequant, y, rtol=0, atol=1e-12 * spread)
    # at most 2^bits levels per group
    for grp in y.reshape(-1, group):
        assert grp.unique().numel() <= 2**bits
    # idempotent on its own grid: re-quantizing with the same scale and zero changes nothing
    s, z = scale_zero(w.reshape(-1, group).amin(1, keepdim=True), w.reshape(-1, group).amax(1, keepdim=True), bits, symmetric)
    again = fake_quant(y.reshape(-1, group), s, z, bits, symmetric).reshape(w.shape)
    torch.testing.assert_close(again, y, rtol=0, atol=1e-12 * spread)
    # and quantize-dequantize of an already quantized weight gives it back
    torch.testing.assert_close(fake_quant_weight(y, bits, group, symmetric), y, rtol=0, atol=1e-9 * spread)


def test_quantization_error_shrinks_with_bits():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errs = [(fake_quant_weight(w, b, 128) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4


# ---- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["w_bits", "a_bits", "kv_bits"])
@pytest.mark.parametrize("value", [1, 9, 0, 32, 4.0])
def test_spec_rejects_bits_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**{field: value})


def test_spec_validates_fields_and_names_presets():
    assert QuantSpec(w_bits=4, w_group_size=128).name == "w4a16g128"
    assert QuantSpec(w_bits=4, a_bits=4, kv_bits=4).name == "w4a4"
    assert QuantSpec(w_bits=3, w_group_size=-1).w_group_size is None
    with pytest.raises(ValueError, match="a_granularity"):
        QuantSpec(a_granularity="channel")
    with pytest.raises(ValueError, match="w_group_size"):
        QuantSpec(w_group_size=-5)
    with pytest.raises(ValueError, match="unknown quant setting"):
        QuantSpec.from_config({"w_bit": 4})
    with pytest.raises(ValueError, match="does not divide the input width 100"):
        QuantSpec(w_group_size=64).validate_linear(100)
    with pytest.raises(AttributeError):
        QuantSpec().w_bits = 3  # frozen


def test_group_size_that_does_not_divide_is_rejected():
    with pytest.raises(ValueError, match="w_group_size=64 does not divide the input width 100"):
        fake_quant_weight(torch.randn(4, 100), 4, 64)


def test_non_floating_and_non_finite_weights_are_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        fake_quant_weight(torch.ones(4, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="floating-point"):
        fake_quant_per_token(torch.ones(4, 8, dtype=torch.int64), 4)
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        validate_weight(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight_int(bad, 4)


def test_lwc_logits_must_match_groups():
    with pytest.raises(ValueError, match="one logit per group"):
        fake_quant_weight(torch.randn(4, 128), 4, 64, gamma=torch.zeros(4))
