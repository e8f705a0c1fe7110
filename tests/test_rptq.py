"""RPTQ: channel clustering, the reorders that fold exactly, per-cluster activation and KV-cache quantization."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, Qwen3Config

from omniq_lightning.calib import ActivationCache
from omniq_lightning.methods import ModelTraits
from omniq_lightning.methods.rptq import RPTQ
from omniq_lightning.models import adapter_for
from omniq_lightning.nn import ClusterActQuantizer, QuantMatMul
from omniq_lightning.quant import QuantSpec, fake_quant_per_tensor, tensor_range_params
from omniq_lightning.solvers import (
    activations_in_full_precision,
    full_precision_weights,
    site_statistics,
    weight_linears,
)
from omniq_lightning.transforms import BlockSetup, TransformSite
from omniq_lightning.transforms.reorder import cluster_labels, permutation, range_points

QUICK = ["calib.nsamples=16", "eval.max_windows=20", "eval.fp_baseline=false", "trainer.enable_progress_bar=false"]


def tiny_opt():
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def tiny_qwen3():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def reordered(model, adapter, spec, index=1, n=3, seqlen=40):
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(2))
    cache = ActivationCache(n, (seqlen, adapter.hidden_size(model)), torch.float32, "cpu")
    ctx = adapter.capture(model, (ids[i : i + 1] for i in range(n)), cache, "cpu")[index]
    block = adapter.prepare_block(copy.deepcopy(adapter.blocks(model)[index]))
    with torch.no_grad():
        ref = adapter.call_block(block, cache.all(), ctx)
    method = RPTQ(weights="rtn", clusters=4, head_clusters=2)
    qb = adapter.build_quant_block(block, method.setup(spec, ModelTraits(adapter.recipe_family)))
    stats = site_statistics(qb, cache, ctx, qb.sites)
    for site in qb.sites:
        method.cluster_site(qb, site, stats)
    return qb, cache, ctx, ref


@pytest.mark.parametrize("family", ["llama", "opt", "qwen3"])
def test_folded_reorders_leave_the_full_precision_block_unchanged(stories, family):
    """R3 (v rows, o columns per value head, GQA-aware) and R5 (gate/up or fc1 rows, down or fc2 columns) are
    folded into the weights: with every quantizer off, the reordered block computes the original function."""
    model = {"llama": lambda: stories.model, "opt": tiny_opt, "qwen3": tiny_qwen3}[family]()
    adapter = adapter_for(model.config.model_type)
    qb, cache, ctx, ref = reordered(model, adapter, QuantSpec(w_bits=4, a_bits=4, kv_bits=4))
    original = {n: m.weight for n, m in adapter.blocks(model)[1].named_modules() if hasattr(m, "weight")}
    moved = [n for n, m in qb.block.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
             and n in original and not torch.equal(m.weight, original[n])]
    assert any("v_proj" in n for n in moved) and any(n.endswith(("down_proj", "fc2")) for n in moved)
    with torch.no_grad(), full_precision_weights(weight_linears(qb).values()), activations_in_full_precision(qb):
        out = qb(cache.all(), ctx)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_a_per_cluster_quantizer_equals_contiguous_groups_after_the_reorder():
    """Mapping each channel to its cluster's range gives exactly what reordering the channels into contiguous
    clusters and quantizing each group would give."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 24, generator=gen) * torch.linspace(0.1, 8, 24)
    labels = cluster_labels(range_points(x.amin(0), x.amax(0)), 5)
    q = ClusterActQuantizer(4, labels, 5)
    q.observing = True
    q(x)
    q.observing = False
    perm = permutation(labels)
    xs, ls = x[:, perm], labels[perm]
    expected = torch.empty_like(xs)
    for c in range(5):
        cols = ls == c
        scale, zero = tensor_range_params(xs[:, cols].min(), xs[:, cols].max(), 4, False)
        expected[:, cols] = fake_quant_per_tensor(xs[:, cols], scale, zero, 4)
    assert torch.equal(q(x)[:, perm], expected)
    dynamic = ClusterActQuantizer(4, labels, 5, dynamic=True)(x)
    row = x[3:4, perm][:, ls == 2]
    s, z = tensor_range_params(row.min(), row.max(), 4, False)
    assert torch.equal(dynamic[3:4, perm][:, ls == 2], fake_quant_per_tensor(row, s, z, 4))


def test_key_and_value_clusters_follow_their_heads_under_gqa(stories):
    qb, *_ = reordered(stories.model, stories.adapter, QuantSpec(w_bits=4, a_bits=4, kv_bits=4))
    mm = next(m for m in qb.modules() if isinstance(m, QuantMatMul))
    n_kv, n_heads, hd = 4, 8, 8
    assert mm.k_quant.labels.shape == (n_kv, 1, hd) and mm.q_quant.labels.shape == (n_heads, 1, hd)
    for h in range(n_kv):  # every key head has its own clusters; the query heads that read it cluster alike
        assert set(mm.k_quant.labels[h].flatten().tolist()) <= set(range(2 * h, 2 * h + 2))
        for r in range(2):
            assert torch.equal(mm.q_quant.labels[2 * h + r] % 8, mm.k_quant.labels[h] % 8)
    assert torch.equal(mm.v_quant.labels, torch.sort(mm.v_quant.labels, dim=-1).values)  # folded: contiguous


def test_the_kv_cache_settings_quantize_only_keys_and_values(quick_run):
    from omniq_lightning.export import load_fake_quant

    ppl, res, out = quick_run("rptq", "w4a4kv")
    assert res["quant"]["name"] == "w4a4kv" and res["quant"]["a_bits"] == 16 and res["quant"]["kv_bits"] == 4
    loaded = load_fake_quant(out / "model")
    quantizers = [n for n, m in loaded.model.named_modules() if isinstance(m, ClusterActQuantizer)]
    assert quantizers and all(n.endswith(("k_quant", "v_quant")) for n in quantizers)
    assert not [n for n, m in loaded.model.named_modules() if getattr(m, "act_quant", None) is not None]
    assert ppl < 2 * quick_run("rtn", "w4a16")[0]


@pytest.mark.parametrize("quant", ["w4a8", "w4a4"])
def test_static_per_cluster_activations_beat_per_tensor_static_baselines(quick_run, quant):
    """Measured over calibration seeds 0, 1 x OMP_NUM_THREADS 1, 2 (benchmarks/RESULTS.md, "Robust margins"):
    w4a8 RPTQ / static RTN 0.956-0.965, / static SmoothQuant 0.949-0.957; w4a4 / static RTN 0.093-0.124 (static
    SmoothQuant at w4a4: 0.106, seed 0 only). Asserted 0.98."""
    rptq = quick_run("rptq", quant)[0]
    assert rptq < 0.98 * quick_run("rtn", quant, "quant.a_granularity=tensor")[0]
    assert rptq < 0.98 * quick_run("smoothquant", quant, "quant.a_granularity=tensor")[0]


def test_rptq_composes_with_learned_clipping_and_its_export_reloads(quick_run, data_dir):
    from omniq_lightning.data import load_corpus, tokenize
    from omniq_lightning.eval import perplexity
    from omniq_lightning.export import load_fake_quant

    ppl, res, out = quick_run("rptq", "w4a8", "method.weights=omniquant", "method.epochs=2")
    assert res["blocks"][0]["clip_max_mean"] < 1.0  # LWC trained
    loaded = load_fake_quant(out / "model")
    assert any(isinstance(m, ClusterActQuantizer) for m in loaded.model.modules())
    ids = tokenize(load_corpus("tinystories", "eval", data_dir), loaded.tokenizer)
    assert perplexity(loaded.model, ids, 256, max_windows=20).perplexity == pytest.approx(ppl, rel=1e-5)


def test_rptq_refuses_weight_only_settings_and_undeclared_families():
    with pytest.raises(ValueError, match="RPTQ clusters activation channels"):
        RPTQ().validate(QuantSpec(w_bits=4))
    with pytest.raises(ValueError, match="method.weights"):
        RPTQ(weights="awq")
    fused = TransformSite("vo", "vo", "self_attn.qkv_proj", ("self_attn.o_proj",), source_rows=(96, 128))
    with pytest.raises(ValueError, match="fused projections"):
        RPTQ().check_model(ModelTraits("llama", sites=(fused,)))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        RPTQ().check_model(ModelTraits("llama", experts=True))
    assert BlockSetup(QuantSpec(w_bits=4)).scaled is False


def test_kv_memory_formula_matches_a_hand_count():
    """OPT-66B at batch 64 x 8192: K and V of 64 layers x 72 heads x 128 dims in fp16 = 1237.0e9 bytes; at
    4 bits a quarter, plus a 16-bit scale and zero point per token, head and tensor."""
    import importlib.util
    import sys

    from tests.conftest import REPO

    spec_ = importlib.util.spec_from_file_location("kv_memory", REPO / "benchmarks" / "kv_memory.py")
    kv = importlib.util.module_from_spec(spec_)
    sys.modules["kv_memory"] = kv  # dataclasses look their module up while the file executes
    spec_.loader.exec_module(kv)
    shape = kv.Shape.from_config(kv.MODELS["opt-66b"])
    vectors = 2 * 64 * 64 * 8192 * 72
    assert kv.kv_bytes(shape, 16, 64, 8192) == vectors * 128 * 2 == pytest.approx(1237.0e9, rel=1e-4)
    assert kv.kv_bytes(shape, 4, 64, 8192) == vectors * (128 * 4 + 32) / 8
    # the block linears of OPT-66B hold 64 x 12 x 9216^2 weights; in fp16 with the embeddings ~131 GB
    fp16 = kv.weight_bytes(shape, kv.spec_for("fp16"))
    assert fp16 == 2 * (64 * 12 * 9216**2 + shape.fp16_params())
    w4 = kv.weight_bytes(shape, kv.spec_for("w4a16"))
    assert w4 == (64 * sum(kv.spec_for("w4a16").weight_format.storage_bits(o, i) for o, i in shape.block_linears())
                  + 16 * shape.fp16_params()) / 8


def test_the_moving_average_observer_follows_the_released_formula_per_channel():
    """ema_minmax: per channel, the first window's min/max, then ``d * old + (1 - d) * new`` per window; a
    cluster's range is the extremes of its channels' averages (checked in float64 by hand)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    windows = [torch.randn(1, 7, 6, generator=gen) * torch.linspace(0.5, 3, 6) for _ in range(3)]
    q = ClusterActQuantizer(3, labels, 3, observer="ema_minmax", ema_decay=0.9)
    q.observing = True
    for w in windows:
        q(w)
    lo, hi = windows[0].double().amin((0, 1)), windows[0].double().amax((0, 1))
    for w in windows[1:]:
        lo, hi = 0.9 * lo + 0.1 * w.double().amin((0, 1)), 0.9 * hi + 0.1 * w.double().amax((0, 1))
    for c in range(3):
        assert q.lo[c].item() == pytest.approx(lo[labels == c].min().item(), rel=1e-6)
        assert q.hi[c].item() == pytest.approx(hi[labels == c].max().item(), rel=1e-6)
    one = ClusterActQuantizer(3, labels, 3, observer="ema_minmax")  # one window: the plain extremes
    ref = ClusterActQuantizer(3, labels, 3)
    for m in (one, ref):
        m.observing = True
        m(windows[0])
    assert torch.equal(one.lo, ref.lo) and torch.equal(one.hi, ref.hi)
    heads = torch.tensor([[0, 1, 1, 0], [2, 2, 3, 3]])[:, None, :]  # keys: [heads, 1, head_dim]
    k = ClusterActQuantizer(3, heads, 4, observer="ema_minmax")
    k.observing = True
    kv = torch.randn(1, 2, 5, 4, generator=gen)
    k(kv)
    assert torch.equal(k.hi[2], kv[0, 1, :, :2].max()) and torch.equal(k.lo[1], kv[0, 0, :, 1:3].min())


def test_the_moving_average_observer_runs_end_to_end_and_narrows_the_kv_ranges(quick_run):
    """On stories260K w3a3kv: method.observer=ema_minmax reaches the cluster quantizers, and in the first block
    (the same inputs in both runs) its ranges lie inside the min-max ones (a moving average of window
    extremes never exceeds their extremes), narrower somewhere."""
    from omniq_lightning.export import load_fake_quant

    runs = {o: quick_run("rptq", "w3a3kv", f"method.observer={o}") for o in ("minmax", "ema_minmax")}
    assert runs["ema_minmax"][1]["config"]["method"]["observer"] == "ema_minmax"
    ranges = {}
    for o, (ppl, _, out) in runs.items():
        assert math.isfinite(ppl)
        model = load_fake_quant(out / "model").model
        ranges[o] = {n: (m.lo, m.hi) for n, m in model.named_modules()
                     if isinstance(m, ClusterActQuantizer) and ".layers.0." in f".{n}"}
    assert ranges["ema_minmax"].keys() == ranges["minmax"].keys() and ranges["minmax"]
    narrower = False
    for n, (lo, hi) in ranges["ema_minmax"].items():
        lo0, hi0 = ranges["minmax"][n]
        assert bool((lo >= lo0 - 1e-6).all() and (hi <= hi0 + 1e-6).all()), n
        narrower |= bool(((hi - lo) < (hi0 - lo0) - 1e-6).any())
    assert narrower


def test_a_bad_observer_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="minmax"):
        RPTQ(observer="percentile")
    with pytest.raises(ValueError, match="ema_decay"):
        RPTQ(observer="ema_minmax", ema_decay=1.0)


def test_a_run_with_clustered_quantizers_resumes_its_finished_blocks(tmp_path, stories_dir):
    """Run the same RPTQ command again over a finished run's blocks (what a resumed run does with every block it
    finished): the per-cluster quantizers saved with each block are put back and the result is the same."""
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    args = ["method=rptq", "quant=w4a8", "method.weights=rtn", "calib.nsamples=8", "eval.max_windows=5",
            "eval.fp_baseline=false", "trainer.enable_progress_bar=false", "logger=csv", f"output_dir={tmp_path}"]
    first = run(compose(args))
    (tmp_path / "results.json").unlink()
    again = run(compose(args))
    assert all(b.get("resumed") == 1.0 for b in again["blocks"])
    assert again["perplexity"]["tinystories"]["perplexity"] == first["perplexity"]["tinystories"]["perplexity"]
