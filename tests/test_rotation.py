"""Rotations and learned transforms for weight-activation quantization (issue 23): the Hadamard constructions are
orthogonal in float64, the online transforms equal their dense matrices with the gradients of a float64 reference,
and learned affine transforms fold exactly; end to end on stories260K."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from omniq_lightning.transforms.affine import KroneckerAffine, kron_factors
from omniq_lightning.transforms.rotation import (
    OnlineRotation,
    factor,
    hadamard_matrix,
    paley,
    random_orthogonal,
    sylvester,
)
from tests.conftest import QUICK


@pytest.mark.parametrize("m", [12, 20, 24, 28, 36, 44, 60])
def test_paley_constructions_are_hadamard_matrices(m):
    h = paley(m)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n,expected", [(64, (1, 64, True)), (576, (36, 16, True)), (1536, (12, 128, True)),
                                        (172, (43, 4, False)), (4096, (1, 4096, True)), (11008, (43, 256, False))])
def test_sizes_factor_into_a_hadamard_or_orthogonal_part_and_a_power_of_two(n, expected):
    assert factor(n) == expected
    r = hadamard_matrix(n, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    q = random_orthogonal(7, 1)
    assert torch.allclose(q.T @ q, torch.eye(7, dtype=torch.float64), atol=1e-12)
    assert torch.equal(sylvester(8) @ sylvester(8).T, 8 * torch.eye(8, dtype=torch.float64))


@pytest.mark.parametrize("n", [64, 576, 172, 12 * 8, 1536])  # one dense matmul up to 640, three small ones beyond
@pytest.mark.parametrize("signed", [False, True])
def test_the_online_rotation_is_its_matrix_with_float64_gradients(n, signed):
    rot = OnlineRotation(n, seed=5, signed=signed).double()
    x = torch.randn(3, 5, n, dtype=torch.float64, requires_grad=True)
    y = rot(x)
    m = rot.matrix()
    torch.testing.assert_close(y, x @ m, rtol=1e-12, atol=1e-12)
    assert torch.allclose(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-6)  # float32 factors, rounded
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ m.T, rtol=1e-12, atol=1e-12)
    half = rot.float()(x.detach().half())  # half precision in, float32 arithmetic, half out
    assert half.dtype == torch.float16 and torch.allclose(half.double(), x.detach() @ m, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("n", [576, 64, 172, 1536])
def test_the_kronecker_affine_transform_and_its_fold_match_float64(n):
    assert kron_factors(576) == (24, 24) and kron_factors(1536) == (32, 48) and kron_factors(172) == (4, 43)
    t = KroneckerAffine(n).double()
    gen = torch.Generator().manual_seed(n)
    with torch.no_grad():
        t.a.add_(0.1 * torch.randn(t.a.shape, generator=gen, dtype=torch.float64))
        t.b.add_(0.1 * torch.randn(t.b.shape, generator=gen, dtype=torch.float64))
    p = t.matrix()
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=gen, requires_grad=True)
    y = t(x)
    torch.testing.assert_close(y, x @ p, rtol=1e-10, atol=1e-10)
    w = torch.randn(7, n, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(t.fold(w).double(), w @ torch.linalg.inv(p).T, rtol=1e-5, atol=1e-6)  # float32 inverse
    g = torch.randn_like(y)
    y.backward(g)  # the factors' gradients against the dense float64 product's
    ref_a, ref_b = t.a.detach().clone().requires_grad_(True), t.b.detach().clone().requires_grad_(True)
    (x.detach() @ torch.kron(ref_a, ref_b) * g).sum().backward()
    torch.testing.assert_close(t.a.grad, ref_a.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t.b.grad, ref_b.grad, rtol=1e-10, atol=1e-10)


def test_learned_affine_transforms_fold_exactly(stories):
    """Random (non-identity) affine transforms at every site of a stories260K block, at 16 bits: the transformed
    block, and the block folded with its online parts in the readers' slots, compute the original block."""
    from omniq_lightning.calib import ActivationCache, observe_linear_inputs
    from omniq_lightning.quant import QuantSpec
    from omniq_lightning.transforms import BlockSetup
    from omniq_lightning.transforms.affine import AFFINE_LOCATIONS

    model, adapter = stories.model, stories.adapter
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    cache = ActivationCache(2, (64, 64), torch.float32, "cpu")
    ctx = adapter.capture(model, (ids[i: i + 1] for i in range(2)), cache, "cpu")[1]
    block = adapter.prepare_block(copy.deepcopy(adapter.blocks(model)[1]))
    with torch.no_grad(), observe_linear_inputs(block) as stats:
        ref = adapter.call_block(block, cache.all(), ctx)
    setup = BlockSetup(QuantSpec(w_bits=16, lwc=False), scale_locations=("norm", "vo"),
                       affine_locations=AFFINE_LOCATIONS)
    qb = adapter.build_quant_block(copy.deepcopy(block), setup, stats)
    assert set(qb.affine) == {"attn_in", "vo", "mlp_in", "up_down"}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in qb.affine_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for p in qb.let_parameters():
            p.mul_(torch.empty(p.shape).uniform_(0.5, 2.0, generator=gen))
        unfolded = qb(cache.all(), ctx)
        folded = adapter.call_block(qb.fold(), cache.all(), ctx)
    scale = ref.abs().max().item()
    assert (unfolded - ref).abs().max().item() <= 1e-4 * scale
    assert (folded - ref).abs().max().item() <= 1e-4 * scale
    assert qb.block.self_attn.q_proj.input_transform is qb.block.self_attn.k_proj.input_transform  # shared, online


def test_omniquant_with_quarot_and_learned_transforms_exports_and_resumes(tmp_path, data_dir):
    """The learned recipe end to end: QuaRot's rotations, then LWC, LET and affine transforms trained per block;
    the export with its online parts re-attached by load_fake_quant gives the run's perplexity, and a rerun over the
    finished blocks gives the same."""
    from safetensors.torch import load_file

    from omniq_lightning.config import compose
    from omniq_lightning.data import load_corpus, tokenize
    from omniq_lightning.eval import perplexity
    from omniq_lightning.export import load_fake_quant
    from omniq_lightning.export.hf import RUNTIME, is_runtime_state
    from omniq_lightning.pipeline import run

    args = ["method=omniquant", "quant=w4a4", "rotation=quarot", "method.affine=true", "quant.lac=true",
            "method.epochs=2", *QUICK, f"output_dir={tmp_path}", "calib.nsamples=8", "eval.max_windows=6"]
    res = run(compose(args))
    assert res["rotation"]["settings"]["residual"] and any("affine_attn_in_drift" in b for b in res["blocks"])
    # the learned activation clipping and the affine factors travel in the runtime file, not in the checkpoint
    # that transformers loads
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    runtime = load_file(str(tmp_path / "model" / RUNTIME))
    assert not [k for k in saved if is_runtime_state(k)] and any(k.endswith("act_quant.clip") for k in runtime)
    loaded = load_fake_quant(tmp_path / "model")
    ids = tokenize(load_corpus("tinystories", "eval", str(data_dir)), loaded.tokenizer)
    ppl = res["perplexity"]["tinystories"]["perplexity"]
    assert perplexity(loaded.model, ids, 256, max_windows=6).perplexity == pytest.approx(ppl, rel=1e-5)
    again = run(compose(args))
    assert all(b["resumed"] == 1.0 for b in again["blocks"])
    assert again["perplexity"]["tinystories"]["perplexity"] == ppl
    assert math.isfinite(ppl)


def test_rotations_compose_with_every_method_and_exports_say_what_they_hold(tmp_path):
    """RPTQ's clusters (static ranges, KV cache), a mixed plan and GPTQ weights all run on the rotated model; a
    packed format takes a rotated model whose rotations all fold or change nothing (weight-only); compressed-tensors holds R4 in its
    transform_config, which compressed-tensors' own loader applies to give our model back; a format with no place
    for online transforms refuses them before any work."""
    import json

    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from omniq_lightning.config import compose
    from omniq_lightning.export import UnsupportedFormat, load_fake_quant
    from omniq_lightning.nn import ActQuantizer
    from omniq_lightning.pipeline import run
    from omniq_lightning.solvers.hooks import quantizers_off

    quick = [*QUICK, "calib.nsamples=8", "eval.max_windows=4"]
    for name, args in {"rptq": ["method=rptq", "quant=w4a4kv"], "mixed": ["method=gptq", "quant=mixed"],
                       "gptq": ["method=gptq", "quant=w4a16", "export.format=gptq", "rotation.qk=true"]}.items():
        res = run(compose([*args, "rotation=quarot", *quick, f"output_dir={tmp_path / name}"]))
        assert math.isfinite(res["perplexity"]["tinystories"]["perplexity"]), name
    # weight-only, R3 changes nothing (q.k is unchanged and nothing in attention is quantized): gptq holds it
    assert res["export_packed"]["format"] == "gptq" and res["rotation"]["settings"]["qk"]
    assert not res["rotation"]["settings"]["down"]
    with pytest.raises(UnsupportedFormat, match="transforms that run online.*R4.*rotation.qk=false rotation.down=false"):
        run(compose(["method=gptq", "quant=w4a16", "rotation=quarot", "rotation.down=true", "export.format=gptq",
                     *quick, f"output_dir={tmp_path / 'online'}"]))
    assert not (tmp_path / "online").exists()

    w8a8 = ["method=rtn", "quant=w8a8", "quant.w_symmetric=true", "quant.kv_bits=16", "rotation=quarot",
            "export.format=compressed-tensors", "export.dtype=float32", *quick, f"output_dir={tmp_path / 'w8a8'}"]
    run(compose(w8a8))
    packed = tmp_path / "w8a8" / "model-compressed-tensors"
    config = TransformConfig.model_validate(json.loads((packed / "config.json").read_text())
                                            ["quantization_config"]["transform_config"])
    ours = load_fake_quant(tmp_path / "w8a8" / "model").model
    (scheme,) = config.config_groups.values()  # one R4 shared by every down projection
    assert [a.location for a in scheme.apply] == ["input"] and len(scheme.apply[0].targets) == len(ours.model.layers)
    # compressed-tensors' loader, weights dequantized (float32 scales: exact), against ours with the activation
    # quantizers off (compressed-tensors' int8 step differs from ours): the same function
    model = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(0, ours.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), quantizers_off([m for m in ours.modules() if isinstance(m, ActQuantizer)]):
        want = ours(input_ids=ids).logits
        unrotated = model(input_ids=ids).logits
        apply_transform_config(model, config)
        stored = {k: v for k, v in load_file(str(packed / "model.safetensors")).items() if "omniq_input_" in k}
        assert len(stored) == 1 and not model.load_state_dict(stored, strict=False).unexpected_keys
        got = model(input_ids=ids).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-4 * scale
    assert (unrotated - want).abs().max().item() > 1e-2 * scale  # the transform is what makes it right


@pytest.mark.parametrize("n", [128, 172, 1536])
def test_compressed_tensors_applies_our_online_input_transforms_exactly(n):
    """Sylvester sizes become a hadamard scheme, others a stored matrix; compressed-tensors' own transform
    modules, given the config and the stored tensors, compute what our online linears compute."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from torch import nn

    from omniq_lightning.export.compressed_tensors import ct_transforms
    from omniq_lightning.export.online import online_inputs
    from omniq_lightning.nn import OnlineInputLinear

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(n, 8), nn.Linear(n, 8), nn.Linear(n, 8))
    ours = copy.deepcopy(plain)
    for i in range(2):  # two linears share one rotation, the third has a learned transform
        ours[i] = OnlineInputLinear(ours[i], OnlineRotation(n, seed=1))
    affine = KroneckerAffine(n)
    with torch.no_grad():
        affine.a.add_(0.1 * torch.randn_like(affine.a))
    ours[2] = OnlineInputLinear(ours[2], affine)
    config, tensors = ct_transforms(online_inputs(ours))
    types = [g["type"] for g in config["config_groups"].values()]
    assert types == ["hadamard" if n == 128 else "random-matrix", "random-matrix"]
    apply_transform_config(plain, TransformConfig.model_validate(config))
    assert not plain.load_state_dict(tensors, strict=False).unexpected_keys
    x = torch.randn(4, n)
    for i in range(3):
        torch.testing.assert_close(plain[i](x), ours[i](x), rtol=1e-5, atol=1e-5)


def test_online_transforms_name_their_kind_and_packed_formats_say_which_they_hold():
    """A sandwich-norm model's residual rotation runs online after its norms: only the fake-quant export holds it."""
    from omniq_lightning.export import ExportRequest, check_export
    from omniq_lightning.methods.base import ModelTraits
    from omniq_lightning.passes.rotation import RotationSettings
    from omniq_lightning.pipeline import online_transforms
    from omniq_lightning.quant import QuantSpec
    from omniq_lightning.transforms import BlockSetup, OnlineRotations

    spec = QuantSpec(w_bits=4, a_bits=16, kv_bits=16, w_symmetric=True)
    setup = BlockSetup(spec, rotations=OnlineRotations(False, False, 0))
    gemma = ModelTraits("llama", sandwich_norms=True)
    kinds = online_transforms(spec, setup, RotationSettings(qk=False, down=False), gemma)
    assert kinds == ("norm_output_rotation",)
    assert online_transforms(spec, setup, RotationSettings(qk=False, down=False), ModelTraits("llama")) == ()
    request = ExportRequest(spec, frozenset({spec.weight_format}), online_transforms=kinds)
    check_export("fake", request)
    with pytest.raises(ValueError, match="after each sandwich norm"):
        check_export("compressed-tensors", request)
