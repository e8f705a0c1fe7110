"""VPTQ: vector formats and their exact bit counts, codebooks, second-order assignment, the vq export rebuilt bit
for bit, and the method on the real tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from omniq_lightning.export import ExportRequest, UnsupportedFormat, check_export, dequantize_vq, load_vq_checkpoint
from omniq_lightning.export.vq import vq_config, vq_tensors
from omniq_lightning.quant import QuantSpec
from omniq_lightning.quant.spec import VectorFormat
from omniq_lightning.quant.vq import vq_quantize

# stories260K is 64 wide: a 16-centroid codebook of 2-vectors (2 index bits per weight) keeps the codebook's
# share small there, and normalisation (32 bits per input column) off.
VQ2_TINY = ["quant.w_vq.vector=2", "quant.w_vq.centroids=16", "quant.w_vq.normalize=false"]
FORMATS = [
    VectorFormat(4, 256),
    VectorFormat(4, 256, residual_centroids=16),
    VectorFormat(2, 16, outlier_fraction=0.05, outlier_vector=4, outlier_centroids=32, normalize=False),
    VectorFormat(8, 64, residual_centroids=4, outlier_fraction=0.1, outlier_vector=2, outlier_centroids=8),
]


def layer(out_f=64, in_f=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * torch.rand(1, in_f, generator=g).add(0.2)
    X = torch.randn(512, in_f, generator=g) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g))
    X = X * torch.linspace(0.2, 3.0, in_f)
    return W, X, (2 * X.T.double() @ X.double() / X.shape[0])


def test_bad_vector_formats_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="power of two"):
        VectorFormat(4, 100)
    with pytest.raises(ValueError, match="vector length"):
        VectorFormat(0, 16)
    with pytest.raises(ValueError, match="outlier_fraction"):
        VectorFormat(4, 16, outlier_fraction=1.0)
    with pytest.raises(ValueError, match="does not divide the output width 30"):
        VectorFormat(4, 16).validate_shape(30, 64)
    with pytest.raises(ValueError, match="unknown w_vq setting"):
        QuantSpec.from_config({"w_vq": {"vector": 4, "k": 16}})


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_bit_accounting_is_exact(fmt):
    """The format's count (from shapes) equals the bits of what is stored (from the tensors), and the export's
    bytes are those bits up to each packed row's padding to int32 words."""
    W, _, H = layer()
    q = vq_quantize(W, H, fmt, iters=5)
    bits = fmt.storage_bits(*W.shape)
    counted = 16 * q.outlier_columns.numel() + sum(  # indices at log2(k) bits, fp16 centroids and statistics
        cb.indices.numel() * int(math.log2(cb.centroids.shape[0])) + 16 * cb.centroids.numel()
        for cb in (q.main, q.residual, q.outlier) if cb is not None)
    counted += 0 if q.col_mean is None else 16 * (q.col_mean.numel() + q.col_std.numel())
    assert counted == bits
    tensors = vq_tensors(q, "m")
    index_words = sum(t.numel() for k, t in tensors.items() if k.endswith(".indices"))
    rows = sum(t.shape[0] for k, t in tensors.items() if k.endswith(".indices"))
    stored = sum(t.numel() * t.element_size() * 8 for k, t in tensors.items() if not k.endswith(".indices"))
    assert bits <= stored + 32 * index_words < bits + 32 * rows
    assert 0 < q.outlier_columns.numel() == math.ceil(fmt.outlier_fraction * W.shape[1]) or not fmt.outlier_fraction


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_exported_tensors_dequantize_exactly(fmt):
    W, _, H = layer(seed=1)
    q = vq_quantize(W, H, fmt, iters=5)
    cfg = vq_config({"m": q})["config_for_layers"]["m"]
    assert torch.equal(dequantize_vq(vq_tensors(q, "m"), "m", json.loads(json.dumps(cfg))), q.dequantize())
    # every stored value is what the format says: fp16 centroids and statistics, indices within the codebook
    for cb in (q.main, q.residual, q.outlier):
        if cb is not None:
            assert torch.equal(cb.centroids, cb.centroids.half().float())
            assert int(cb.indices.max()) < cb.centroids.shape[0]


def test_second_order_feedback_lowers_the_output_error():
    """Column-wise assignment with GPTQ's error feedback beats nearest-centroid assignment on the same codebook
    (measured 0.48-0.50x the output error over layer seeds; asserted with room)."""
    W, X, H = layer(seed=2)
    fmt = VectorFormat(4, 64, normalize=False)
    with_h = vq_quantize(W, H, fmt, iters=20).dequantize()
    plain = vq_quantize(W, None, fmt, iters=20).dequantize()

    def out_err(Q):
        return float(((X.double() @ (W - Q).T.double()) ** 2).mean())

    assert out_err(with_h) < 0.8 * out_err(plain)


def test_kmeans_codebook_beats_a_scalar_grid_at_equal_bits():
    """Vectors of 4 with 256 centroids (2 bits) against 2-bit per-channel round-to-nearest on a Gaussian layer:
    k-means captures the joint distribution (weight MSE measured 0.29-0.30x over seeds)."""
    from omniq_lightning.quant import WeightFormat, quantize_weight

    W, _, _ = layer(256, 512, seed=3)
    vq = vq_quantize(W, None, VectorFormat(4, 256, normalize=False), iters=20).dequantize()
    rtn = quantize_weight(W, WeightFormat(2)).dequantize()
    assert float(((W - vq) ** 2).mean()) < 0.7 * float(((W - rtn) ** 2).mean())


def test_presets_name_their_index_bits():
    from omniq_lightning.config import compose
    from omniq_lightning.mixed import quant_settings

    for preset, index_bits in (("vq2", 2), ("vq3", 3), ("vq4", 4)):
        spec, _ = quant_settings(compose([f"quant={preset}", "method=vptq"]).quant)
        assert spec.name == preset and spec.w_vq.index_bits == index_bits
        # SmolLM2-135M's linears (576 wide, 1536 MLP): codebooks and statistics add well under 0.2 bits
        shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
        bits = sum(spec.w_vq.storage_bits(o, i) for o, i in shapes) / sum(o * i for o, i in shapes)
        assert index_bits < bits < index_bits + 0.2


def test_wrong_method_or_export_is_refused(tmp_path):
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    with pytest.raises(ValueError, match="lacks what method=gptq needs.*fitted by method=vptq"):
        run(compose(["model=stories260k", "method=gptq", "quant=vq2", f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="w2 \\(scalar\\) lacks what method=vptq needs \\(codebook\\)"):
        run(compose(["model=stories260k", "method=vptq", "quant=w2a16", f"output_dir={tmp_path}"]))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before anything is written
    spec = QuantSpec.from_config({"w_vq": {"vector": 4, "centroids": 256}})
    with pytest.raises(UnsupportedFormat, match="export.format=vq"):
        check_export("gptq", ExportRequest(spec, frozenset({spec.weight_format})))
    w2 = QuantSpec(w_bits=2)
    with pytest.raises(UnsupportedFormat, match="holds vector weight formats, not scalar"):
        check_export("vq", ExportRequest(w2, frozenset({w2.weight_format})))


@pytest.fixture(scope="module")
def vq_run(quick_run):
    # float32 for the tensors that are not vector-quantized, so that the whole checkpoint can be compared bit for bit
    return quick_run("vptq", "vq2", *VQ2_TINY, "export.format=vq", "export.dtype=float32")


def test_vq_export_rebuilds_the_fake_quant_model_bit_for_bit(vq_run):
    _, res, out = vq_run
    assert res["export_packed"]["format"] == "vq"
    fake = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    rebuilt = load_vq_checkpoint(out / "model-vq", dtype=torch.float32)
    a, b = fake.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, fake.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fake(ids).logits, rebuilt(ids).logits)


def test_bits_per_weight_counts_codebooks(vq_run, stories):
    from omniq_lightning.mixed import linear_shapes

    _, res, _ = vq_run
    fmt = VectorFormat(2, 16, normalize=False)
    shapes = linear_shapes(stories.model, stories.adapter).values()
    expected = sum(fmt.storage_bits(o, i) for o, i in shapes) / sum(o * i for o, i in shapes)
    assert res["bits_per_weight"] == round(expected, 4)
    assert 2.0 < res["bits_per_weight"] < 2.15
    assert all(b["vq_seconds"] > 0 for b in res["blocks"])


def test_vq_at_2_bits_beats_scalar_2_bit_methods(vq_run, quick_run):
    """stories260K, 2 index bits (2.08 bits per weight with codebooks) against per-channel w2 (2.24 bits).
    Measured (calibration seeds 0 / 1): VQ 68.5 / 77.2, AWQ 79.9 / 80.0, GPTQ 376, RTN 588. The lead over AWQ
    is not robust on this 64-wide model (3-15%), so it is reported in benchmarks/RESULTS.md, not asserted here;
    against RTN and GPTQ: asserted 3x."""
    vq = vq_run[0]
    scalar = {m: quick_run(m, "w2a16")[0] for m in ("rtn", "gptq")}
    assert 3 * vq < min(scalar.values())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_cuda_kernel_dequantization_is_bit_exact(fmt):
    from omniq_lightning.nn.vq_linear import dequantize_with_kernel

    W, _, H = layer(seed=4)
    q = vq_quantize(W, H, fmt, iters=5).to("cuda")
    w = dequantize_with_kernel(q)
    assert w is not None, "the CUDA extension did not build (see the log line of omniq_lightning.quant.cuda)"
    assert torch.equal(w, q.dequantize())


@needs_cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_kernel_gemv_matches_the_reference(fmt, dtype):
    """The lookup GEMV sums in float32 in another order than a matmul: equal to float32 rounding, then to the
    output dtype's rounding."""
    from omniq_lightning.nn.vq_linear import VQLinear, gemv_with_kernel

    W, _, H = layer(seed=5)
    q = vq_quantize(W, H, fmt, iters=5).to("cuda")
    x = torch.randn(3, W.shape[1], device="cuda").to(dtype)
    ref = (x.double() @ q.dequantize().double().T)
    y = gemv_with_kernel(x, q)
    assert y is not None and y.dtype == dtype and y.shape == ref.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = float((x.double().abs() @ q.dequantize().double().abs().T).max())
    assert float((y.double() - ref).abs().max()) <= tol * scale
    lin = VQLinear(q, torch.randn(W.shape[0], device="cuda"))  # few tokens: GEMV; many: dequantize + matmul
    for tokens in (2, 64):
        xt = torch.randn(tokens, W.shape[1], device="cuda")
        expect = xt.double() @ q.dequantize().double().T + lin.bias.double()
        assert torch.allclose(lin(xt).double(), expect, rtol=1e-4, atol=1e-4)
