"""Quantizers and their gradients against the independent float64 reference, plus grid properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from omniq_lightning.quant import (
    QuantSpec,
    WeightFormat,
    fake_quant,
    fake_quant_per_tensor,
    fake_quant_per_token,
    fake_quant_weight,
    quantize_weight,
    tensor_range_params,
    truncate_ste,
    validate_weight,
)
from omniq_lightning.quant.weight import group_grid
from tests import quant_reference as ref


def fmt(bits=4, group=None, symmetric=False, kind="uniform", exponent=1.5):
    return WeightFormat(bits, group, symmetric, kind, exponent)

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
    y = fake_quant_weight(w, fmt(bits, group, symmetric), gamma, beta)
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
    y = fake_quant_weight(w_lp, fmt(bits, 64), gamma.float(), beta.float())
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


@example(rows=2, groups=3, group=8, bits=2, symmetric=False, seed=3, spread=1.0)  # a group of one sign
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
    y = fake_quant_weight(w, fmt(bits, group, symmetric))
    q = quantize_weight(w, fmt(bits, group, symmetric))
    # values are on the grid: unsigned integer codes in range that reproduce the fake-quant output
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    dequant = ((q.codes.double().reshape(-1, group) - q.zero.reshape(-1, 1)) * q.scale.reshape(-1, 1)).reshape(w.shape)
    torch.testing.assert_close(dequant, y, rtol=0, atol=1e-6 * spread)  # codes keep float32 scales
    # at most 2^bits levels per group
    for grp in y.reshape(-1, group):
        assert grp.unique().numel() <= 2**bits
    # idempotent on its own grid: re-quantizing with the same scale and zero changes nothing (the grid the weight
    # was quantized on: asymmetric ranges are widened to hold 0, see quant.weight.group_grid)
    g = group_grid(w.reshape(-1, group), fmt(bits, group, symmetric))
    again = fake_quant(y.reshape(-1, group), g.scale, g.zero, bits, symmetric).reshape(w.shape)
    torch.testing.assert_close(again, y, rtol=0, atol=1e-12 * spread)
    # and quantize-dequantize of an already quantized weight gives it back
    torch.testing.assert_close(fake_quant_weight(y, fmt(bits, group, symmetric)), y, rtol=0, atol=1e-9 * spread)


def test_quantization_error_shrinks_with_bits():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errs = [(fake_quant_weight(w, fmt(b, 128)) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
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
        QuantSpec(w_group_size=64).weight_format.validate_shape(8, 100)
    with pytest.raises(AttributeError):
        QuantSpec().w_bits = 3  # frozen


def test_group_size_that_does_not_divide_is_rejected():
    with pytest.raises(ValueError, match="w_group_size=64 does not divide the input width 100"):
        fake_quant_weight(torch.randn(4, 100), fmt(4, 64))


def test_non_floating_and_non_finite_weights_are_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        fake_quant_weight(torch.ones(4, 8, dtype=torch.int32), fmt(4))
    with pytest.raises(ValueError, match="floating-point"):
        fake_quant_per_token(torch.ones(4, 8, dtype=torch.int64), 4)
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        validate_weight(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(bad, fmt(4))


def test_lwc_logits_must_match_groups():
    with pytest.raises(ValueError, match="one logit per group"):
        fake_quant_weight(torch.randn(4, 128), fmt(4, 64), gamma=torch.zeros(4))


# ---- released ranges, learned rounding, the power grid: gradients against the float64 reference ------------


def with_ties(w, group):
    """Make the max and the min of every other group appear twice (amax/amin share gradients between ties)."""
    g = w.detach().clone().reshape(-1, group or w.shape[1])
    for i in range(0, g.shape[0], 2):
        g[i, 1] = g[i].max()
        g[i, 2] = g[i].min()
    return g.reshape(w.shape)


def weight_case_all(shape, group, bits, symmetric, lwc, seed, grid_kind="uniform", offset=False, ties=False):
    w, gamma, beta = make_case(shape, group, seed=seed, lwc=lwc)
    if ties:
        w = with_ties(w, group)
    v = None
    if offset:
        v = torch.empty(shape, dtype=torch.float64).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(seed))
    return w, gamma, beta, v


def check_weight_case(w, gamma, beta, v, f, ranges):
    w, gamma, beta, v = (None if t is None else t.detach().clone().requires_grad_(True) for t in (w, gamma, beta, v))
    y = fake_quant_weight(w, f, gamma, beta, v, ranges)
    dy = torch.randn(w.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    (y * dy).sum().backward()
    res = ref.weight_fake_quant(
        w.detach().numpy(), f.bits, f.group_size, f.symmetric,
        None if gamma is None else gamma.detach().numpy(), None if beta is None else beta.detach().numpy(),
        grad_out=dy.numpy(), offset=None if v is None else v.detach().numpy(), ranges=ranges, grid=f.grid,
        exponent=f.grid_exponent,
    )
    y_ref, gw_ref, gg_ref, gb_ref = res[:4]
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), gw_ref, rtol=1e-9, atol=1e-12)
    if gamma is not None:
        np.testing.assert_allclose(gamma.grad.numpy(), gg_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(beta.grad.numpy(), gb_ref, rtol=1e-9, atol=1e-12)
    if v is not None:
        np.testing.assert_allclose(v.grad.numpy(), res[4], rtol=1e-9, atol=1e-12)
    return w.grad


@pytest.mark.parametrize("shape,group", [((7, 64), 64), ((13, 192), 64), ((3, 37), None)])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("lwc", [False, True])
def test_released_ranges_pass_the_range_gradient_to_the_extremes(shape, group, bits, symmetric, lwc):
    w, gamma, beta, _ = weight_case_all(shape, group, bits, symmetric, lwc, seed=bits + shape[1], ties=True)
    grad = check_weight_case(w, gamma, beta, None, fmt(bits, group, symmetric), "released")
    ste = check_weight_case(w, gamma, beta, None, fmt(bits, group, symmetric), "detached")
    assert not torch.equal(grad, ste)  # the range gradient is really there


@pytest.mark.parametrize("shape,group", [((7, 64), 64), ((5, 40), None)])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("ranges", ["detached", "released"])
def test_learned_rounding_offsets_get_their_gradient(shape, group, bits, symmetric, ranges):
    w, gamma, beta, v = weight_case_all(shape, group, bits, symmetric, True, seed=3 * bits, offset=True)
    check_weight_case(w, gamma, beta, v, fmt(bits, group, symmetric), ranges)


@pytest.mark.parametrize("shape,group", [((7, 64), 64), ((5, 40), None)])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("exponent", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("ranges", ["detached", "released"])
def test_power_grid_and_its_gradients_match_float64_reference(shape, group, bits, symmetric, exponent, ranges):
    w, gamma, beta, v = weight_case_all(shape, group, bits, symmetric, True, seed=bits + 7, offset=True)
    check_weight_case(w, gamma, beta, v, fmt(bits, group, symmetric, "power", exponent), ranges)
    check_weight_case(w, gamma, beta, None, fmt(bits, group, symmetric, "power", exponent), ranges)


def test_power_grid_puts_more_levels_near_the_centre():
    w = torch.linspace(-1, 1, 4001, dtype=torch.float64).reshape(1, -1)
    levels = fake_quant_weight(w, fmt(4, None, True, "power", 2.0)).unique()
    gaps = levels.diff()
    assert levels.numel() == 16 and gaps[len(gaps) // 2] < gaps[0] / 4  # sign(c)|c|^2, c on 16 points: dense near 0
    uniform = fake_quant_weight(w, fmt(4, None, True)).unique().diff()
    torch.testing.assert_close(uniform, torch.full_like(uniform, uniform[0].item()))


@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 129)])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_token_released_ranges_match_float64_reference(shape, bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    x = with_ties(x.reshape(-1, shape[-1]), None).reshape(shape).requires_grad_(True)
    y = fake_quant_per_token(x, bits, symmetric, ranges="released")
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    (y * dy).sum().backward()
    y_ref, gx_ref = ref.token_fake_quant(x.detach().numpy(), bits, symmetric, grad_out=dy.numpy(), ranges="released")
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), gx_ref, rtol=1e-9, atol=1e-12)


# ---- integer codes: the stored form reproduces the fake-quant weight exactly -----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("f", [fmt(4, 64), fmt(3, None, True), fmt(2, 32), fmt(8, 64, True), fmt(3, 64, False, "power"),
                               fmt(4, None, True, "power", 2.0)], ids=lambda f: f.name)
@pytest.mark.parametrize("learned", [False, True])
def test_codes_dequantize_to_the_fake_quant_weight_bit_for_bit(dtype, f, learned):
    gen = torch.Generator().manual_seed(f.bits)
    w = (torch.randn(24, 128, generator=gen) * 0.05).to(dtype)
    n = 24 * (128 // (f.group_size or 128))
    gamma = beta = v = None
    if learned:
        gamma = torch.empty(n).uniform_(0.5, 4, generator=gen)
        beta = torch.empty(n).uniform_(0.5, 4, generator=gen)
        v = torch.empty(24, 128).uniform_(-0.5, 0.5, generator=gen)
    q = quantize_weight(w, f, gamma, beta, v)
    expected = fake_quant_weight(w, f, gamma, beta, v)
    assert torch.equal(q.dequantize().to(dtype), expected)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2**f.bits
    assert q.scale.shape == q.zero.shape == (24, 128 // (f.group_size or 128))


def test_truncation_keeps_scales_away_from_zero_and_passes_gradients():
    s = torch.tensor([1e-4, -1e-4, 0.0, 0.5, -2.0], requires_grad=True)
    t = truncate_ste(s, 1e-2)
    assert t.tolist() == pytest.approx([1e-2, -1e-2, 1e-2, 0.5, -2.0])
    t.sum().backward()
    assert s.grad.tolist() == [1.0] * 5


def test_weight_format_counts_its_storage_exactly():
    assert fmt(4, 128).storage_bits(256, 1024) == 256 * 1024 * 4 + 256 * 8 * (16 + 4)
    assert fmt(3, None, True).storage_bits(10, 64) == 10 * 64 * 3 + 10 * 16
    assert fmt(2, 64, False, "power").storage_bits(4, 128) == 4 * 128 * 2 + 4 * 2 * 32
    with pytest.raises(ValueError, match="w_grid must be one of"):
        WeightFormat(grid="log")
    with pytest.raises(ValueError, match="w_grid_exponent"):
        WeightFormat(grid="power", grid_exponent=0.5)


@pytest.mark.parametrize("ranges", ["detached", "released"])
@pytest.mark.parametrize("bits", [2, 4])
def test_one_signed_groups_widen_to_zero_so_the_zero_point_is_a_code(ranges, bits):
    """An asymmetric group whose weights are all positive (or all negative) gets a range that holds 0, as GPTQ's
    quantizer does: its zero point is then one of the codes, which every packed format requires."""
    w, gamma, beta, _ = weight_case_all((6, 32), 8, bits, False, True, seed=bits)
    w = w.abs()
    w[1] = -w[1]  # one all-negative row too
    check_weight_case(w, gamma, beta, None, fmt(bits, 8), ranges)
    q = quantize_weight(w.float(), fmt(bits, 8), gamma.float(), beta.float())
    assert q.zero.min() >= 0 and q.zero.max() <= 2**bits - 1
    assert torch.equal(q.zero, q.zero.round())
