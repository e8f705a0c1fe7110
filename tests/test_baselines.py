"""Baselines on the same rails: GPTQ's math against direct least squares, and every method on stories260K."""

from __future__ import annotations

import pytest
import torch

from omniq_lightning.config import compose
from omniq_lightning.methods import GPTQ, OmniQuant
from omniq_lightning.pipeline import run
from omniq_lightning.quant import WeightFormat, fake_quant_weight, grid, grid_of
from omniq_lightning.quant.gptq import HessianAccumulator, gptq_quantize
from omniq_lightning.solvers.awq import group_gram, group_output_errors, quadratic_output_mse


def data(n=256, d=12, m=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    W = torch.randn(m, d, generator=gen, dtype=torch.float64)
    return X, W


def rtn_columns(W, bits=3, group=None):
    """Column quantizer on W's static min/max grid (per output channel or per group)."""
    g = grid_of(W, WeightFormat(bits, group))
    n_groups = W.shape[1] // (group or W.shape[1])
    S, Z = g.scale.view(W.shape[0], n_groups), g.zero.view(W.shape[0], n_groups)
    qmin, qmax = grid(bits, False)
    g = group or W.shape[1]
    return lambda w, j: (torch.clamp(torch.round(w / S[:, j // g]) + Z[:, j // g], qmin, qmax) - Z[:, j // g]) * S[:, j // g]


def test_hessian_is_two_x_transpose_x_over_n():
    X, _ = data()
    acc = HessianAccumulator(X.shape[1])
    for chunk in X.split(100):  # accumulated over uneven batches
        acc.add(chunk)
    ref = 2 * X.double().T @ X.double() / X.shape[0]
    assert acc.H.dtype == torch.float64
    # each batch's product in float32: float32 rounding of sums over 100 tokens, against the float64 reference
    torch.testing.assert_close(acc.H, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_gptq_update_is_the_least_squares_solution():
    """Fix column 0 to its quantized value: GPTQ's update of the other columns must be the weights
    that minimise ||X W^T - X W'^T||^2 given that column (solved directly here)."""
    X, W = data()
    H = 2 * X.T @ X / X.shape[0]
    q0 = torch.round(W[:, 0] * 2) / 2
    Q = gptq_quantize(W, H, lambda w, j: q0 if j == 0 else w, blocksize=4, percdamp=0.0)
    target = X @ W.T - X[:, :1] @ q0[None]  # what the remaining columns must produce
    rest = torch.linalg.lstsq(X[:, 1:], target).solution.T
    torch.testing.assert_close(Q[:, 0], q0)
    torch.testing.assert_close(Q[:, 1:], rest, rtol=1e-8, atol=1e-8)


def test_lazy_batch_updates_do_not_change_the_result():
    X, W = data(d=24)
    H = 2 * X.T @ X / X.shape[0]
    a = gptq_quantize(W, H, rtn_columns(W), blocksize=128)
    b = gptq_quantize(W, H, rtn_columns(W), blocksize=5)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("act_order", [False, True])
def test_static_groups_stay_consistent_under_activation_ordering(act_order):
    X, W = data(d=24, m=5)
    X[:, 17] *= 30  # a column that activation ordering moves to the front
    H = 2 * X.T @ X / X.shape[0]
    group = 8
    Q = gptq_quantize(W, H, rtn_columns(W, 3, group), act_order=act_order)
    g = grid_of(W, WeightFormat(3, group))
    codes = Q.reshape(-1, group) / g.scale + g.zero
    assert torch.allclose(codes, codes.round(), atol=1e-6)  # every column on its original group's grid
    assert codes.round().min() >= 0 and codes.round().max() <= 7


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    X, W = data(d=32, m=16)
    H = 2 * X.T @ X / X.shape[0]
    for act_order in (False, True):
        Q = gptq_quantize(W, H, rtn_columns(W, 3), act_order=act_order)
        rtn = fake_quant_weight(W, WeightFormat(3))
        assert (X @ (Q - W).T).pow(2).sum() < 0.8 * (X @ (rtn - W).T).pow(2).sum()


@pytest.mark.parametrize("group", [24, 8])
def test_awq_clipping_errors_through_gram_matrices_equal_the_token_sums(group):
    X, W = data(d=24, m=5)
    diff = fake_quant_weight(W, WeightFormat(3, group)) - W
    ref = torch.stack([((X.double().reshape(len(X), -1, group)[:, g] @ diff.double().reshape(5, -1, group)[:, g].T)
                        ** 2).sum(0) for g in range(24 // group)], dim=1)
    got = group_output_errors(diff.reshape(5, -1, group), group_gram(X, group))
    assert ref.shape == got.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-9)


def test_awq_scale_objective_through_the_gram_matrix_equals_the_mean_over_tokens():
    X, W = data(d=24, m=7)
    d = fake_quant_weight(W, WeightFormat(3)) - W
    ref = ((X.double() @ d.double().T) ** 2).mean().item()
    assert quadratic_output_mse(d, X.T @ X, len(X)) == pytest.approx(ref, rel=1e-5)


# ---- every method on the real tiny model -----------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("quant", ["w3a16", "w4a16"])
def test_gptq_and_awq_beat_rtn_on_weight_only(quick_run, method, quant):
    assert quick_run(method, quant)[0] < quick_run("rtn", quant)[0]


@pytest.mark.parametrize("quant", ["w6a6", "w4a4"])
def test_smoothquant_beats_rtn_on_weight_activation(quick_run, quant):
    assert quick_run("smoothquant", quant)[0] < quick_run("rtn", quant)[0]


def test_gptq_with_activation_ordering_runs_on_the_real_model(quick_run):
    assert quick_run("gptq", "w3a16", "method.act_order=true")[0] < quick_run("rtn", "w3a16")[0]


# ---- bad configurations fail fast (before any model loads) ---------------------------------------------


def test_smoothquant_refuses_weight_only_settings(tmp_path):
    with pytest.raises(ValueError, match="SmoothQuant .* needs a weight-activation setting"):
        run(compose(["method=smoothquant", "quant=w4a16", f"output_dir={tmp_path}"]))


def test_gptq_dampening_out_of_range():
    with pytest.raises(ValueError, match="dampening method.damp=1.5 is out of range"):
        GPTQ(damp=1.5)


def test_group_size_that_does_not_divide_a_layer_is_refused_naming_the_layer(tmp_path):
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj: w_group_size=8 does not divide the input width 172"):
        run(compose(["method=gptq", "quant=w4a16", "quant.w_group_size=8", f"output_dir={tmp_path}"]))


@pytest.mark.parametrize("composition", ["method.init=awq", "method.rounding=gptq"])
def test_omniquant_compositions_run_and_beat_rtn(quick_run, composition):
    assert quick_run("omniquant", "w3a16", "method.epochs=10", composition)[0] < quick_run("rtn", "w3a16")[0]


def test_composition_settings_are_validated():
    with pytest.raises(ValueError, match="method.init"):
        OmniQuant(init="gptq")
    with pytest.raises(ValueError, match="method.rounding"):
        OmniQuant(rounding="stochastic")
