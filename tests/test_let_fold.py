"""Equivalence transforms are exact: LET-transformed and folded blocks compute the original function."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, Qwen2Config

from omniq_lightning.calib import ActivationCache, observe_linear_inputs
from omniq_lightning.models import adapter_for
from omniq_lightning.quant import QuantSpec
from omniq_lightning.transforms import LOCATIONS, BlockSetup


def every_pair(spec: QuantSpec) -> BlockSetup:
    """A plan that builds every transform the adapter declares."""
    return BlockSetup(spec, scale_locations=LOCATIONS)

NO_QUANT = QuantSpec(w_bits=16, a_bits=16, kv_bits=16, lwc=False)
W4A4 = QuantSpec(w_bits=4, a_bits=4, kv_bits=4)
W3G = QuantSpec(w_bits=3, w_group_size=4)  # 4 divides 172, the intermediate width of stories260K


def block_setup(model, adapter, index=1, seqlen=48):
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, seqlen), generator=torch.Generator().manual_seed(1))
    cache = ActivationCache(2, (seqlen, model.config.hidden_size), torch.float32, "cpu")
    ctx = adapter.capture(model, (ids[i : i + 1] for i in range(2)), cache, "cpu")[index]
    block = adapter.prepare_block(copy.deepcopy(adapter.blocks(model)[index]))
    x = cache.all() * 3  # larger activations make any inexactness visible
    with torch.no_grad(), observe_linear_inputs(block) as stats:
        ref = adapter.call_block(block, x, ctx)
    return block, x, ctx, stats, ref


def randomize_let(qblock, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in qblock.let_parameters():
            if p.dim() and p is not None:
                p.mul_(torch.empty(p.shape).uniform_(0.3, 3.0, generator=gen))
        for pair in qblock.let.values():
            if pair.shift is not None:
                pair.shift.add_(torch.randn(pair.shift.shape, generator=gen))


def check_exact(model, adapter):
    block, x, ctx, stats, ref = block_setup(model, adapter)
    scale = ref.abs().max().item()
    # 1) random LET factors without quantization leave the block's function unchanged
    qb = adapter.build_quant_block(copy.deepcopy(block), every_pair(NO_QUANT), stats)
    randomize_let(qb)
    with torch.no_grad():
        unfolded = qb(x, ctx)
        folded_block = qb.fold()
        folded = adapter.call_block(folded_block, x, ctx)
    assert (unfolded - ref).abs().max().item() <= 2e-5 * scale
    assert (folded - ref).abs().max().item() <= 2e-5 * scale
    # 2) with quantization, folding into plain weights gives the unfolded quantized block's output
    for spec in (W4A4, W3G):
        qb = adapter.build_quant_block(copy.deepcopy(block), every_pair(spec), stats)
        randomize_let(qb, seed=3)
        with torch.no_grad():
            unfolded = qb(x, ctx)
            folded = adapter.call_block(qb.fold(), x, ctx)
        assert (folded - unfolded).abs().max().item() <= 2e-5 * scale, spec.name


def test_llama_let_folding_is_exact_under_gqa_and_rope(stories):
    model = stories.model
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    check_exact(model, stories.adapter)


def test_qk_scale_must_respect_rotary_pairs(stories):
    """The q/k factor is shared by each rotary pair; breaking that (as a per-channel factor would) is not exact."""
    block, x, ctx, stats, ref = block_setup(stories.model, stories.adapter)
    qb = stories.adapter.build_quant_block(copy.deepcopy(block), every_pair(NO_QUANT), stats)
    pair = qb.let["qk"]
    pair.expand_target = lambda p: torch.cat([p, 2 * p], dim=-1).reshape(-1)  # different scales within a pair
    n_kv, rep = 4, 2
    pair.expand_source = lambda p: pair.expand_target(p).view(n_kv, 1, -1).expand(n_kv, rep, -1).reshape(-1)
    with torch.no_grad():
        pair.scale.uniform_(0.3, 3.0)
        out = qb(x, ctx)
    assert (out - ref).abs().max().item() > 1e-3 * ref.abs().max().item()


def test_opt_let_folding_is_exact_with_shifts():
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # non-trivial biases and norms so that shifts matter
        for name, p in model.named_parameters():
            if "bias" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    check_exact(model, adapter_for("opt"))


def test_qwen2_let_folding_is_exact_with_qkv_biases():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.add_(torch.randn_like(p))
    check_exact(model, adapter_for("qwen2"))


def test_quantized_block_explains_itself(stories):
    block, x, ctx, stats, _ = block_setup(stories.model, stories.adapter)
    qb = stories.adapter.build_quant_block(copy.deepcopy(block), every_pair(QuantSpec(w_bits=4, w_group_size=4, a_bits=8)),
                                        stats)
    text = str(qb)
    assert "w4 g4 asym +LWC" in text and "a8 per-token" in text and "LET pairs" in text


def test_lwc_without_let_has_only_clipping_parameters(stories):
    block, *_ = block_setup(stories.model, stories.adapter)
    qb = stories.adapter.build_quant_block(copy.deepcopy(block), BlockSetup(QuantSpec(w_bits=3)))
    params = list(qb.quant_parameters())
    assert len(params) == 2 * 7  # gamma and beta for q, k, v, o, gate, up, down
    with pytest.raises(ValueError, match="statistics"):
        stories.adapter.build_quant_block(copy.deepcopy(block), every_pair(QuantSpec(w_bits=3)))
