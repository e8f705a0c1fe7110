"""The model families people quantize today, on tiny random models built from their transformers configs
(2 layers, hidden 64): capture and replay are exact, transforms fold exactly, every method runs end to end
and its export loads back. No real checkpoint of these families is available here: these tests are the proof."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SiglipVisionConfig,
)

from omniq_lightning.calib import ActivationCache, observe_linear_inputs
from omniq_lightning.data import load_corpus, tokenize
from omniq_lightning.data.windows import eval_windows
from omniq_lightning.eval import perplexity
from omniq_lightning.models import adapter_for
from omniq_lightning.nn import LETRouter, QuantLinear
from omniq_lightning.quant import QuantSpec
from omniq_lightning.transforms import LOCATIONS, BlockSetup
from tests.conftest import llama_cpp_perplexity, replay

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
    "gemma3_text": lambda: Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                            layer_types=["sliding_attention", "full_attention"],
                                            rope_local_base_freq=100.0),
    "gemma3": lambda: Gemma3Config(  # multimodal: the text stack is quantized, the vision tower left alone
        text_config=Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"]),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14), mm_tokens_per_image=4),
    "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=64),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32, norm_topk_prob=True),
}
FAMILIES = list(CONFIGS)
SEQLEN = 48  # longer than the sliding windows (8), so that local and global attention differ


def attn_of(family: str) -> str:
    return "eager" if family == "gemma2" else "sdpa"  # Gemma-2's soft-capping needs eager attention


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation=attn_of(family)).eval()
    with torch.no_grad():  # non-trivial norms (Gemma's start at zero) and biases, so folding errors show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def captured(model, adapter, n=2):
    ids = torch.randint(0, 512, (n, SEQLEN), generator=torch.Generator().manual_seed(1))
    cache = ActivationCache(n, (SEQLEN, adapter.hidden_size(model)), torch.float32, "cpu")
    contexts = adapter.capture(model, (ids[i : i + 1] for i in range(n)), cache, "cpu")
    return ids, cache, contexts


def folding_sites(adapter, block):
    """The names of the block's sites where a diagonal transform folds."""
    return {s.name for s in adapter.sites(block) if s.diagonal_folds}


def last_block_output(model, adapter, ids):
    out = {}
    handle = adapter.blocks(model)[-1].register_forward_hook(
        lambda m, a, o: out.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return out["h"]


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_and_replay_are_exact(family):
    model = tiny(family)
    adapter = adapter_for(model.config.model_type)
    ids, cache, contexts = captured(model, adapter)
    replayed = replay(model, adapter, cache.all(), contexts)
    expected = torch.cat([last_block_output(model, adapter, ids[i : i + 1]) for i in range(len(ids))])
    assert (replayed - expected).abs().max().item() == 0.0


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2", "qwen3"])
def test_each_block_replays_with_its_own_mask_and_rotary_embedding(family):
    """Sliding-window and global layers get different masks (Gemma-3 also its local rotary base): block 0's
    context replayed on every block would silently be wrong."""
    model = tiny(family)
    adapter = adapter_for(model.config.model_type)
    ids, cache, contexts = captured(model, adapter)
    assert contexts[0] is not contexts[1]
    wrong = replay(model, adapter, cache.all(), [contexts[0]] * len(contexts))
    right = replay(model, adapter, cache.all(), contexts)
    assert (wrong - right).abs().max().item() > 1e-4


def randomized_pairs(qblock, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in qblock.let_parameters():
            p.mul_(torch.empty(p.shape).uniform_(0.5, 2.0, generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
def test_transforms_fold_exactly(family):
    model = tiny(family)
    adapter = adapter_for(model.config.model_type)
    _, cache, contexts = captured(model, adapter)
    x, ctx = cache.all() * 2, contexts[1]
    block = adapter.prepare_block(copy.deepcopy(adapter.blocks(model)[1]))
    original = adapter.call_block(adapter.blocks(model)[1], x, ctx).detach()
    with torch.no_grad(), observe_linear_inputs(block) as stats:
        ref = adapter.call_block(block, x, ctx)
    scale = ref.abs().max().item()
    assert (ref - original).abs().max().item() <= 1e-5 * scale  # preparing (unfusing experts) keeps the function
    declared = folding_sites(adapter, block)
    qb = adapter.build_quant_block(copy.deepcopy(block), BlockSetup(QuantSpec(w_bits=16, lwc=False), scale_locations=LOCATIONS), stats)
    assert set(qb.let) == declared
    randomized_pairs(qb, 0)
    with torch.no_grad():
        unfolded = qb(x, ctx)
        folded = adapter.call_block(qb.fold(), x, ctx)
    assert (unfolded - ref).abs().max().item() <= 2e-5 * scale
    assert (folded - ref).abs().max().item() <= 2e-5 * scale
    for spec in (QuantSpec(w_bits=4, w_group_size=16), QuantSpec(w_bits=4, a_bits=8, kv_bits=8)):
        qb = adapter.build_quant_block(copy.deepcopy(block), BlockSetup(spec, scale_locations=LOCATIONS), stats)
        randomized_pairs(qb, 1)
        with torch.no_grad():
            unfolded = qb(x, ctx)
            folded = adapter.call_block(qb.fold(), x, ctx)
        diff = (folded - unfolded).abs()
        if spec.weight_only:  # the folded weights are the unfolded quantized weights
            assert diff.max().item() <= 2e-5 * scale, spec.name
        else:  # an activation within an ulp of a rounding tie may flip one step, which attention then spreads
            assert diff.mean().item() <= 1e-3 * unfolded.abs().mean().item(), spec.name


def test_sites_say_where_a_diagonal_folds():
    """q_norm / k_norm normalise each head after the projection (Qwen3, Gemma-3): a q/k factor would be undone,
    so there the q/k site takes no diagonal; the MoE norm site reaches the router; Phi-3's sites are on fused rows.
    Every family declares its q/k site (RPTQ clusters it in place either way) except Phi-3."""
    def declared(f):
        model = tiny(f)
        adapter = adapter_for(model.config.model_type)
        return folding_sites(adapter, adapter.prepare_block(adapter.blocks(model)[0]))

    roles = {f: declared(f) for f in FAMILIES}
    for f in ("qwen3", "gemma3_text", "gemma3", "qwen3_moe"):
        assert "qk" not in roles[f]
    for f in ("gemma2", "mixtral", "qwen2_moe"):
        assert "qk" in roles[f]
    moe = tiny("qwen2_moe")
    adapter = adapter_for("qwen2_moe")
    block = adapter.prepare_block(moe.model.layers[0])
    mlp_in = next(d for d in adapter.sites(block) if d.name == "mlp_in")
    assert mlp_in.targets[0] == "mlp.gate" and "mlp.shared_expert_gate" in mlp_in.targets
    phi = next(d for d in adapter_for("phi3").sites(tiny("phi3").model.layers[0]) if d.name == "vo")
    assert phi.source == "self_attn.qkv_proj" and phi.source_rows == (64 + 32, 64 + 64)
    assert "qk" not in {s.name for s in adapter_for("phi3").sites(tiny("phi3").model.layers[0])}


def test_gemma_norm_folds_as_one_plus_w():
    """Gemma's RMSNorm computes x * (1 + w): a LET scale is folded into 1 + w, not into w."""
    from omniq_lightning.transforms import LETNorm

    norm = tiny("gemma3_text").model.layers[0].input_layernorm
    x = torch.randn(3, 64)
    let = LETNorm(copy.deepcopy(norm), offset=1.0)
    s = torch.empty(64).uniform_(0.5, 2.0)
    let.set_let(s, None)
    with torch.no_grad():
        expected = let(x)
        folded = let.fold()(x)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-6)


def test_an_expert_without_calibration_tokens_is_handled(monkeypatch):
    """An expert no calibration token is routed to: no up -> down transform is initialised for it, GPTQ rounds
    it to nearest (there is no Hessian) and says how many; the router stays in full precision."""
    from omniq_lightning.solvers import gptq_block

    model = tiny("mixtral")
    adapter = adapter_for("mixtral")
    _, cache, contexts = captured(model, adapter)
    block = adapter.prepare_block(copy.deepcopy(adapter.blocks(model)[0]))
    router = block.mlp.gate.router
    route = router.forward

    def never_expert_3(x):
        logits, _, _ = route(x)
        masked = logits.float().softmax(-1).index_fill(-1, torch.tensor([3]), 0.0)
        top, idx = masked.topk(2, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    monkeypatch.setattr(router, "forward", never_expert_3)
    with torch.no_grad(), observe_linear_inputs(block) as stats:
        adapter.call_block(block, cache.all(), contexts[0])
    assert "mlp.experts.3.down_proj" not in stats
    qb = adapter.build_quant_block(block, BlockSetup(QuantSpec(w_bits=4), scale_locations=("norm", "up_down")), stats)
    assert "up_down_e3" not in qb.let and "up_down_e2" in qb.let
    rtn = qb.block.mlp.experts[3].down_proj
    expected = rtn.wq(rtn.weight).detach().clone()
    stats_out = gptq_block(qb, cache, contexts[0], damp=0.01, act_order=False, blocksize=128)
    assert stats_out["linears_without_tokens"] == 3  # expert 3's gate, up and down
    assert torch.equal(qb.block.mlp.experts[3].down_proj.weight, expected)
    assert isinstance(qb.block.mlp.gate, LETRouter) and not isinstance(qb.block.mlp.gate.router, QuantLinear)


# ---- every method end to end, and the export loads back ------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, stories_dir):
    """Each tiny model saved with stories260K's tokenizer (vocab 512), so that the pipeline can calibrate it."""
    tok = AutoTokenizer.from_pretrained(stories_dir)
    folders = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        tiny(family).save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[family] = folder
    return folders


QUICK = ["calib.nsamples=4", f"calib.seqlen={SEQLEN}", f"eval.seqlen={SEQLEN}", "eval.max_windows=3",
         "eval.fp_baseline=false", "trainer.enable_progress_bar=false"]
RUNS = [("rtn", "w4a16", []), ("gptq", "w3a16", []), ("awq", "w4a16", []), ("omniquant", "w4a4", ["method.epochs=1"]),
        ("smoothquant", "w8a8", [])]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_runs_and_the_export_loads_back(family, saved_models, tmp_path, data_dir):
    from omniq_lightning.config import compose
    from omniq_lightning.export import load_fake_quant
    from omniq_lightning.pipeline import run

    folder = saved_models[family]
    ids = None
    for method, quant, extra in RUNS:
        out = tmp_path / f"{method}-{quant}"
        res = run(compose([f"model.path={folder}", f"model.name={family}", f"model.attn_implementation={attn_of(family)}",
                           f"method={method}", f"quant={quant}", *extra, *QUICK, f"output_dir={out}"]))
        ppl = res["perplexity"]["tinystories"]["perplexity"]
        assert torch.isfinite(torch.tensor(ppl)), (method, quant)
        loaded = load_fake_quant(out / "model", attn_implementation=attn_of(family))
        if ids is None:
            ids = tokenize(load_corpus("tinystories", "eval", data_dir), loaded.tokenizer)
        again = perplexity(loaded.model, ids, SEQLEN, max_windows=3).perplexity
        assert again == pytest.approx(ppl, rel=1e-4), (method, quant)
        if quant.endswith("a16"):  # weight-only: an ordinary checkpoint in the model's own layout
            plain = AutoModelForCausalLM.from_pretrained(out / "model", attn_implementation=attn_of(family))
            assert perplexity(plain, ids, SEQLEN, max_windows=3).perplexity == pytest.approx(ppl, rel=1e-4)


# ---- rotations (QuaRot): the rotated model computes the original function -------------------------------------------


def rotate_and_compare(model, adapter, ids, settings):
    from omniq_lightning.mixed import linear_shapes
    from omniq_lightning.passes import PassContext
    from omniq_lightning.passes.rotation import RotationPass
    from omniq_lightning.transforms import OnlineRotations

    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    ctx = PassContext(model, adapter, ids, torch.device("cpu"), None, linear_shapes(model, adapter))
    RotationPass(settings).run(ctx)
    with torch.no_grad():
        rotated = model(input_ids=ids).logits.double()
    scale = ref.abs().max().item()
    assert (rotated - ref).abs().max().item() <= 2e-5 * scale
    setup = BlockSetup(QuantSpec(w_bits=16, lwc=False), rotations=OnlineRotations(settings.qk, settings.down, settings.seed))
    blocks = adapter.blocks(model)
    for i in range(len(blocks)):  # the quantized blocks' online rotations (R3 in the attention), at 16 bits
        blocks[i] = adapter.finish_block(adapter.build_quant_block(adapter.prepare_block(blocks[i]), setup).fold())
    with torch.no_grad():
        online = model(input_ids=ids).logits.double()
    assert (online - ref).abs().max().item() <= 2e-5 * scale
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_rotations_keep_the_function(family):
    """R1 (residual, norms fused, a tied head untied), R2 (value heads), R3 (q/k after RoPE, online), R4 (down
    input, online) at 16 bits equal the original model to float32 rounding: RoPE and GQA, q/k norms (Qwen3,
    Gemma-3), Gemma's 1 + w norms and its sandwich norms (rotated online), Phi-3's fused projections, MoE experts,
    routers and shared experts."""
    from omniq_lightning.passes.rotation import RotationSettings

    model = tiny(family)
    adapter = adapter_for(model.config.model_type)
    ids = torch.randint(0, 512, (2, SEQLEN), generator=torch.Generator().manual_seed(3))
    rotate_and_compare(model, adapter, ids, RotationSettings(seed=1))


def test_rotations_on_stories260k_untie_the_head_and_export(stories_dir, data_dir, tmp_path):
    """The real tiny LLaMA (tied embeddings): rotated exactly, and a weight-activation export with its online
    rotations re-attached by load_fake_quant gives the run's perplexity."""
    from omniq_lightning.config import compose
    from omniq_lightning.export import load_fake_quant
    from omniq_lightning.models import load_model
    from omniq_lightning.passes.rotation import RotationSettings
    from omniq_lightning.pipeline import run

    loaded = load_model(str(stories_dir), dtype="float32")
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(4))
    model = rotate_and_compare(loaded.model, loaded.adapter, ids, RotationSettings(seed=2))
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    res = run(compose(["method=gptq", "quant=w4a4", "rotation=quarot", "calib.nsamples=8", "eval.max_windows=4",
                       "eval.fp_baseline=false", "trainer.enable_progress_bar=false", f"output_dir={tmp_path}"]))
    again = load_fake_quant(tmp_path / "model")
    ids = tokenize(load_corpus("tinystories", "eval", str(data_dir)), again.tokenizer)
    assert perplexity(again.model, ids, 256, max_windows=4).perplexity == pytest.approx(
        res["perplexity"]["tinystories"]["perplexity"], rel=1e-5)
    assert res["rotation"]["settings"]["down"] and res["rotation"]["settings"]["qk"]


def test_opt_takes_the_rotations_that_need_no_rmsnorm():
    """OPT's LayerNorms subtract the mean, which a rotation of the residual stream does not commute with: R1 is
    refused before any work; R2 (value heads, biases included) and R4 keep the function."""
    from transformers import OPTConfig

    from omniq_lightning.methods import ModelTraits
    from omniq_lightning.passes.rotation import RotationPass, RotationSettings

    with pytest.raises(ValueError, match="LayerNorms subtract the mean.*rotation.residual=false"):
        RotationPass(RotationSettings()).check_model(ModelTraits("opt", residual_norm="layer"))
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 512, (2, SEQLEN), generator=torch.Generator().manual_seed(3))
    rotate_and_compare(model, adapter_for("opt"), ids, RotationSettings(residual=False, seed=3))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_family_without_a_gguf_layout_is_refused_before_calibration(family, saved_models, tmp_path):
    from omniq_lightning.config import compose
    from omniq_lightning.export import UnsupportedFormat
    from omniq_lightning.pipeline import run

    cfg = compose([f"model.path={saved_models[family]}", f"model.name={family}",
                   f"model.attn_implementation={attn_of(family)}", "method=rtn", "quant=gguf", "export.format=gguf",
                   *QUICK, f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(UnsupportedFormat, match="export.format=gguf cannot hold this quantization: this model's experts"):
        run(cfg)
    assert not (tmp_path / "out").exists()


GGUF_ARCHS = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3"}


@pytest.mark.parametrize("family", list(GGUF_ARCHS))
def test_each_family_gguf_file_holds_its_codes_and_computes_the_model(family, saved_models, tmp_path, data_dir):
    """A Q4_0 file (hidden 64, MLP 128: every linear's rows a multiple of 32) in llama.cpp's architecture for the
    family: transformers (``gguf_file=``) reads every linear's stored weights equal to the fake-quant checkpoint's
    and computes its function (given the model's configuration: its GGUF reader drops Gemma's query scale and
    layer types and Phi-3's partial rotary); where llama-cpp-python is installed, llama.cpp's perplexity over
    the run's windows (longer than the sliding windows) is ours."""
    import gguf

    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    out = tmp_path / "out"
    res = run(compose([f"model.path={saved_models[family]}", f"model.name={family}",
                       f"model.attn_implementation={attn_of(family)}", "method=rtn", "quant=gguf",
                       "quant.w_format.type=Q4_0", "export.format=gguf", *QUICK, f"output_dir={out}"]))
    path = out / "model-gguf" / "model.gguf"
    field = gguf.GGUFReader(str(path)).fields["general.architecture"]
    assert field.contents() == GGUF_ARCHS[family]
    fake = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32,
                                                attn_implementation=attn_of(family)).eval()
    text = fake.config.get_text_config()
    loaded = AutoModelForCausalLM.from_pretrained(out / "model-gguf", gguf_file="model.gguf", dtype=torch.float32,
                                                  config=text, attn_implementation=attn_of(family)).eval()
    theirs = loaded.state_dict()
    linears = 0
    for k, v in fake.state_dict().items():
        name = k.replace("model.language_model.", "model.")
        if name.startswith("model.layers.") and k.endswith("proj.weight"):
            assert torch.equal(theirs[name], v), k
            linears += 1
        elif "norm" in k and name in theirs:  # Gemma's 1 + w stored and read back
            torch.testing.assert_close(theirs[name], v)
    assert linears == text.num_hidden_layers * (4 if family == "phi3" else 7)
    ids = torch.randint(3, 500, (1, SEQLEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fake(ids).logits.log_softmax(-1), loaded(ids).logits.log_softmax(-1)
    assert (a - b).abs().max() < 0.3  # measured 0.005-0.08: the embedding and head in Q8_0 / Q4_0, as llama.cpp's
    ppl = res["perplexity"]["tinystories"]["perplexity"]
    windows = eval_windows(tokenize(load_corpus("tinystories", "eval", data_dir), AutoTokenizer.from_pretrained(out / "model")),
                           SEQLEN, 3)
    theirs_ppl = llama_cpp_perplexity(path, windows)
    if theirs_ppl is not None:
        assert abs(theirs_ppl / ppl - 1) < 0.01, (theirs_ppl, ppl)


def test_gguf_layouts_refuse_what_llama_cpp_would_compute_otherwise():
    """llama.cpp fixes Gemma's query scale by model size and writes no long-context rotary factors: such models
    are refused by export.format=gguf before calibration, naming why."""
    from omniq_lightning.export import UnsupportedFormat, check_export
    from omniq_lightning.export.registry import ExportRequest
    from omniq_lightning.quant.gguf import GGUFFormat

    spec = QuantSpec.from_config({"w_format": {"kind": "gguf", "type": "Q4_0"}, "a_bits": 16, "kv_bits": 16})
    gemma = Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=256).to_dict()
    phi = Phi3Config(**COMMON, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                                "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}).to_dict()
    for config, why in ((gemma, r"scales this Gemma's queries by 1/sqrt\(16\), the model by 1/sqrt\(query_pre_attn_scalar=256"),
                        (phi, "'longrope' rope scaling is not written yet")):
        layout = adapter_for(config["model_type"]).gguf_layout(config)
        req = ExportRequest(spec, frozenset({GGUFFormat("Q4_0")}), model_type=config["model_type"], gguf_layout=layout)
        with pytest.raises(UnsupportedFormat, match=why):
            check_export("gguf", req)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_packed_exports_of_a_renamed_checkpoint_are_refused_before_calibration(fmt, saved_models, tmp_path):
    """transformers saves a multimodal Gemma-3's text model as ``language_model.model``, the loaded model holds it
    as ``model.language_model``: the packed writers (which rewrite the saved checkpoint) are refused before any
    work instead of failing after calibration; GGUF maps both names (above)."""
    from omniq_lightning.config import compose
    from omniq_lightning.export import UnsupportedFormat
    from omniq_lightning.pipeline import run

    cfg = compose([f"model.path={saved_models['gemma3']}", "model.name=gemma3", "method=rtn", "quant=w4a16",
                   f"export.format={fmt}", *QUICK, f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(UnsupportedFormat, match="names this model's text model otherwise.*export.format=fake"):
        run(cfg)
    assert not (tmp_path / "out").exists()
