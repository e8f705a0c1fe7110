"""GGUF: llama.cpp's weight types as exact grids (checked against the ``gguf`` package's own dequantizers, which
read the bytes we write), every method calibrating on them, and the file read back by its consumers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omniq_lightning.nn.formats import GGUFQuantizer, for_shape
from omniq_lightning.quant import QuantSpec, WeightFormat
from omniq_lightning.quant.gguf import (
    GGUF_TYPES,
    GGUFFormat,
    gguf_codes_on,
    gguf_column_quantizer,
    gguf_fake_quant,
    gguf_quantize,
    gguf_type,
    mix_type,
    pack_rows,
    type_for_width,
    use_more_bits,
)
from omniq_lightning.quant.gptq import gptq_quantize
from tests.conftest import llama_cpp_perplexity

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

TYPES = list(GGUF_TYPES)


def weights(seed: int = 0, out: int = 6, width: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, width, generator=g) * 0.05
    w[0, :256] = 0.0  # an all-zero super-block
    w[1] = -w[1].abs() - 0.01  # a row with no positive weight
    w[2, 5] = 0.9  # an outlier
    return w


@pytest.mark.parametrize("name", TYPES)
def test_bytes_read_back_by_gguf_package_equal_fake_quant(name):
    w = weights()
    t = GGUF_TYPES[name]
    c = gguf_quantize(w, GGUFFormat(name))
    fq = gguf_fake_quant(w, t)
    assert torch.equal(c.dequantize(), fq)  # the stored codes are what calibration computed, bit for bit
    raw = pack_rows(c)
    assert raw.shape == (w.shape[0], w.shape[1] // t.block * t.block_bytes)
    theirs = gguf_dequantize(raw, getattr(gguf.GGMLQuantizationType, name))
    np.testing.assert_array_equal(theirs, fq.numpy())


# Without clipping, the largest error in grid steps (float64): half a step where the grid spans the range (Q8_0,
# Q4_1, Q5_1); one step where it holds 2^(b-1) steps on the extreme's side and one fewer on the other (Q4_0, Q5_0);
# for the K-types the rounding of the sub-scales (4, 6 or 8 bits) adds to that (measured on seeds 0-5: Q4_K 0.58,
# Q2_K 0.78, Q5_K 1.20, Q6_K 1.22, Q3_K 1.66).
STEP_BOUND = {"Q8_0": 0.5, "Q4_1": 0.5, "Q5_1": 0.5, "Q5_0": 1.0, "Q4_0": 1.0, "Q4_K": 1.0, "Q2_K": 1.0,
              "Q5_K": 1.5, "Q6_K": 1.5, "Q3_K": 2.0}


@pytest.mark.parametrize("name", TYPES)
def test_error_within_the_grid_step_float64(name):
    w = weights(1)
    t = GGUF_TYPES[name]
    c = gguf_quantize(w, GGUFFormat(name))
    a, _ = c.grid()
    step = a.abs().double().reshape(w.shape[0], -1).repeat_interleave(t.group, dim=1)
    err = (c.dequantize().double() - w.double()).abs()
    limit = STEP_BOUND[name] * step + 1e-3 * w.abs().double() + 1e-7
    assert bool((err <= limit).all()), f"{name}: worst excess {(err - limit).max().item():.3g}"
    assert bool((err[0, :256] == 0).all())  # an all-zero block stays exactly zero


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q3_K", "Q2_K"])
def test_clipping_logits_get_finite_gradients(name):
    w = weights(2)
    t = GGUF_TYPES[name]
    gamma = torch.full((w.shape[0], w.shape[1] // t.group), 3.0, requires_grad=True)
    beta = torch.full_like(gamma, 3.0, requires_grad=True)
    x = torch.randn(16, w.shape[1])
    loss = ((x @ gguf_fake_quant(w, t, gamma, beta).T - x @ w.T) ** 2).mean()
    loss.backward()
    for p in (gamma, beta):
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K"])
def test_gptq_columns_on_the_grid(name):
    """With an identity Hessian GPTQ has no error to spread: it rounds to nearest, so its result is the fake-quant
    weight; with a real Hessian its codes are read off the grid exactly."""
    w = weights(3)
    t = GGUF_TYPES[name]
    quantize, g = gguf_column_quantizer(w, t)
    q = gptq_quantize(w, torch.eye(w.shape[1]), quantize, percdamp=0.0)
    assert torch.equal(q, gguf_fake_quant(w, t))
    x = torch.randn(64, w.shape[1])
    q2 = gptq_quantize(w, x.T @ x / 64, quantize)
    assert torch.equal(gguf_codes_on(q2, g, GGUFFormat(name)).dequantize(), q2)
    with pytest.raises(ValueError, match="not on the given GGUF grid"):
        gguf_codes_on(w, g, GGUFFormat(name))


def test_widths_take_llama_cpp_fallbacks():
    assert type_for_width("Q4_K", 1536) == "Q4_K"
    assert type_for_width("Q4_K", 576) == "Q5_0"  # SmolLM2's hidden width: as llama.cpp's own Q4_K files
    assert type_for_width("Q6_K", 576) == "Q8_0"
    assert type_for_width("Q5_K", 576) == "Q5_1"
    assert type_for_width("Q3_K", 576) == type_for_width("Q2_K", 576) == "Q4_0"  # llama.cpp's fallback since 2026
    assert type_for_width("Q4_0", 172) == "F16"
    assert for_shape(GGUFFormat("Q4_K"), 64, 576) == GGUFFormat("Q5_0")
    assert for_shape(GGUFFormat("Q4_0"), 64, 172) == WeightFormat(bits=16)
    assert for_shape(WeightFormat(4, 64), 64, 576) == WeightFormat(4, 64)
    with pytest.raises(ValueError, match="do not divide the input width 576.*Q8_0, Q5_0, Q4_0, Q5_1, Q4_1.*fallback .* Q5_0"):
        GGUFFormat("Q4_K").validate_shape(8, 576)
    with pytest.raises(ValueError, match="unknown GGUF weight type 'Q3_XS'.*Q8_0"):
        QuantSpec(w_format={"kind": "gguf", "type": "Q3_XS"})


def test_named_mixes_follow_llama_cpp_rules():
    """llama.cpp's per-tensor choice (llama-quant.cpp) for SmolLM2's shape: 30 layers, 3 query heads per key head;
    use_more_bits picks layers 0-2, 5, 8, ..., 23 and 26-29."""
    more = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    assert {i for i in range(30) if use_more_bits(i, 30)} == more
    for i in range(30):
        assert mix_type("Q4_K_M", "attn_v", i, 30, 3) == mix_type("Q4_K_M", "ffn_down", i, 30, 3) == \
            ("Q6_K" if i in more else "Q4_K")
        assert mix_type("Q4_K_M", "attn_q", i, 30, 3) == mix_type("Q4_K_M", "attn_output", i, 30, 3) == "Q4_K"
        assert mix_type("Q3_K_M", "attn_v", i, 30, 3) == ("Q5_K" if i < 2 else "Q4_K")
        assert mix_type("Q3_K_M", "ffn_down", i, 30, 3) == ("Q5_K" if i < 1 else "Q4_K")
        assert mix_type("Q4_K_S", "ffn_down", i, 30, 3) == ("Q5_K" if i < 3 else "Q4_K")
    assert [mix_type("Q3_K_M", r, 7, 30, 3) for r in ("attn_output", "ffn_up", "attn_k")] == ["Q4_K", "Q3_K", "Q3_K"]
    assert [mix_type("Q2_K", r, 7, 30, 3) for r in ("attn_v", "ffn_down", "attn_output", "ffn_gate")] == \
        ["Q3_K", "Q3_K", "Q3_K", "Q2_K"]
    assert mix_type("Q2_K", "attn_v", 7, 30, 4) == "Q4_K"  # 4 or more query heads per key head
    # llama.cpp's 70B rule, after the mix's own: a Q3_K or Q4_K value projection becomes Q5_K
    assert [mix_type(m, "attn_v", 40, 80, 8, seventy_b=True) for m in ("Q4_K_M", "Q3_K_M", "Q2_K", "Q4_K_S")] == \
        ["Q5_K", "Q5_K", "Q5_K", "Q5_K"]
    assert mix_type("Q4_K_M", "attn_v", 42, 80, 8, seventy_b=True) == "Q6_K"  # a layer with more bits keeps Q6_K
    assert GGUFFormat(mix="Q3_K_L").type == "Q3_K" and GGUFFormat(mix="Q3_K_L").name == "gguf-mix-Q3_K_L"
    assert GGUFFormat(mix="Q2_K").name != GGUFFormat("Q2_K").name
    with pytest.raises(ValueError, match="mix Q4_K_M has base type Q4_K, not Q2_K"):
        GGUFFormat("Q2_K", "Q4_K_M")
    with pytest.raises(ValueError, match="unknown GGUF mix 'Q4_K_XL'.*Q4_K_M"):
        GGUFFormat(mix="Q4_K_XL")


def test_quantizer_learns_clipping_and_refuses_learned_rounding():
    spec = QuantSpec(w_format={"kind": "gguf", "type": "Q4_K"})
    wq = GGUFQuantizer(spec.weight_format, 4, 512, lwc=True, lwc_init=4.0)
    assert wq.lwc_gamma.shape == (4, 16) and wq.clip_group == 32
    w = weights(4, 4)
    assert torch.equal(wq.quantize(w).dequantize(), wq(w))
    logits = wq.mse_clip_logits(w)
    assert logits.shape == (4, 16)
    with pytest.raises(ValueError, match="learned rounding offsets are not implemented for GGUF"):
        wq.enable_rounding()


# ---- the pipeline on the real tiny model, and the file's consumers -------------------------------------------------


def read_gguf_weights(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists the fastest dimension first
        out[t.name] = gguf_dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
    return out


@pytest.mark.parametrize("method,gtype", [("rtn", "Q4_0"), ("gptq", "Q4_1"), ("awq", "Q8_0"), ("omniquant", "Q4_K")])
def test_every_method_writes_its_codes_into_the_file(quick_run, method, gtype):
    from safetensors.torch import load_file

    from omniq_lightning.models.base import interleave_rotary_rows

    ppl, res, out = quick_run(method, "gguf", f"quant.w_format.type={gtype}", "export.format=gguf")
    assert res["export_packed"]["format"] == "gguf"
    fake = load_file(str(out / "model" / "model.safetensors"))
    ours = read_gguf_weights(out / "model-gguf" / "model.gguf")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    heads = {"q_proj": 8, "k_proj": 4}
    for i in range(5):
        for hf, gg in names.items():
            part = "self_attn" if "proj" in hf and hf[0] in "qkvo" else "mlp"
            w = fake[f"model.layers.{i}.{part}.{hf}.weight"].float()
            if hf in heads:
                w = w[interleave_rotary_rows(w.shape[0], heads[hf])]
            theirs = torch.from_numpy(ours[f"blk.{i}.{gg}.weight"].astype(np.float32))
            if hf == "down_proj":  # 172 wide: no 32-block type divides it, F16 as llama.cpp does
                torch.testing.assert_close(theirs, w, rtol=1e-3, atol=1e-4)
            else:
                assert torch.equal(theirs, w), f"block {i} {hf}"
    assert np.isfinite(ppl) and ppl < 6.5  # full precision 5.59 on these windows


def test_a_mix_calibrates_each_linear_on_the_type_llama_cpp_gives_it(quick_run):
    """Q3_K_M on stories260K (5 layers, 64 and 172 wide): the rules' types (value projections of layers 0-1 Q5_K,
    the other value and output projections Q4_K, the rest Q3_K) after llama.cpp's width fallbacks, each linear's
    codes in the file, and the file named as llama.cpp names the mix."""
    from safetensors.torch import load_file

    _, res, out = quick_run("rtn", "gguf_mix", "quant.w_format.mix=Q3_K_M", "export.format=gguf")
    assert res["quant"]["name"] == "gguf-mix-Q3_K_M" and res["quant"]["w_format"]["mix"] == "Q3_K_M"
    reader = gguf.GGUFReader(str(out / "model-gguf" / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    expected = {"attn_q": "Q4_0", "attn_k": "Q4_0", "ffn_gate": "Q4_0", "ffn_up": "Q4_0", "attn_output": "Q5_0",
                "ffn_down": "F16"}  # Q3_K -> Q4_0, Q4_K -> Q5_0 (64 wide); 172 wide: no block divides it
    for i in range(5):
        assert types[f"blk.{i}.attn_v.weight"] == ("Q5_1" if i < 2 else "Q5_0")  # Q5_K -> Q5_1
        for role, t in expected.items():
            assert types[f"blk.{i}.{role}.weight"] == t, (i, role)
    field = reader.fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == int(gguf.LlamaFileType.MOSTLY_Q3_K_M)
    fake = load_file(str(out / "model" / "model.safetensors"))
    ours = read_gguf_weights(out / "model-gguf" / "model.gguf")
    w = fake["model.layers.0.self_attn.v_proj.weight"].float()
    assert torch.equal(torch.from_numpy(ours["blk.0.attn_v.weight"].astype(np.float32)), w)


def test_transformers_loads_the_file(quick_run):
    from transformers import AutoModelForCausalLM

    _, _, out = quick_run("omniquant", "gguf", "quant.w_format.type=Q4_K", "export.format=gguf")
    fake = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(out / "model-gguf", gguf_file="model.gguf", dtype=torch.float32)
    sd = loaded.state_dict()
    for k, v in fake.state_dict().items():
        if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "up_proj.weight")):
            assert torch.equal(sd[k], v), k  # transformers undoes llama.cpp's query/key row order
    ids = torch.randint(3, 500, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fake(ids).logits.log_softmax(-1), loaded(ids).logits.log_softmax(-1)
    # the file's embedding and head are Q8_0 (llama.cpp's choice for a 64-wide head): the only difference
    assert (a - b).abs().max() < 0.5


def test_settings_the_file_cannot_hold_are_refused_before_work(tmp_path):
    from omniq_lightning.config import compose
    from omniq_lightning.export import UnsupportedFormat
    from omniq_lightning.pipeline import run

    with pytest.raises(UnsupportedFormat, match="export.format=gguf cannot hold.*holds gguf weight formats, not scalar"):
        run(compose(["method=rtn", "quant=w4a16", "export.format=gguf", f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(UnsupportedFormat, match="llama.cpp runs weight-only"):
        run(compose(["method=rtn", "quant=gguf", "quant.a_bits=8", "export.format=gguf", f"output_dir={tmp_path / 'b'}"]))
    with pytest.raises(ValueError, match="lacks what method=vptq needs"):
        run(compose(["method=vptq", "quant=gguf", f"output_dir={tmp_path / 'c'}"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("method,quant,setting", [("omniquant", "gguf", "quant.w_format.type=Q4_K"),
                                                   ("rtn", "gguf_mix", "quant.w_format.mix=Q3_K_M")])
def test_llama_cpp_computes_our_perplexity(quick_run, method, quant, setting):
    """llama.cpp itself (llama-cpp-python) over the run's evaluation windows: measured 0.03-0.17% above our
    fake-quant perplexity for rtn/gptq/awq/omniquant files and a Q3_K_M mix (the file's Q8_0 embedding and head,
    llama.cpp's float arithmetic); asserted within 1%."""
    pytest.importorskip("llama_cpp")
    from omniq_lightning.config import compose
    from omniq_lightning.data.corpora import load_corpus
    from omniq_lightning.data.windows import eval_windows, tokenize
    from omniq_lightning.models import load_model

    ppl, res, out = quick_run(method, quant, setting, "export.format=gguf")
    entry = res["perplexity"]["tinystories"]
    tok = load_model(str(out / "model"), dtype="float32").tokenizer
    ids = tokenize(load_corpus("tinystories", "eval", compose([]).paths.data_dir), tok)
    windows = eval_windows(ids, entry["seqlen"], entry["windows"])
    theirs = llama_cpp_perplexity(out / "model-gguf" / "model.gguf", windows)
    assert abs(theirs / ppl - 1) < 0.01, (theirs, ppl)


# ---- a mixed plan over GGUF types (quant=gguf_mixed) ---------------------------------------------------------------


def test_mixed_candidates_name_gguf_types():
    from omniq_lightning.mixed import parse_candidate
    from omniq_lightning.mixed.sensitivity import rounded
    from omniq_lightning.quant import WeightFormat

    assert parse_candidate("q4_k") == GGUFFormat("Q4_K") and parse_candidate("F16") == WeightFormat(16)
    assert parse_candidate({"kind": "gguf", "type": "Q2_K"}) == GGUFFormat("Q2_K")
    assert GGUFFormat("Q4_K").fits(512) and not GGUFFormat("Q4_K").fits(576) and GGUFFormat("Q4_0").fits(576)
    w = weights()
    assert torch.equal(rounded(w, GGUFFormat("Q3_K")), gguf_fake_quant(w, gguf_type("Q3_K")))
    assert torch.equal(rounded(w, WeightFormat(16)), w)


def test_a_mixed_plan_writes_each_linear_in_its_gguf_type(quick_run):
    """stories260K (64- and 172-wide rows: Q4_0 / Q5_0 / Q8_0 fit the first, only F16 the down projections) at
    8 bits per weight: the plan's type for every linear is the file's, its codes the fake-quant weights."""
    import json

    from safetensors.torch import load_file

    _, res, out = quick_run("gptq", "gguf_mixed", "quant.mixed.avg_bits=8", "export.format=gguf")
    plan = json.loads((out / "bit_plan.json").read_text())
    assert plan["avg_bits"] <= 8.0
    reader = gguf.GGUFReader(str(out / "model-gguf" / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    fake = load_file(str(out / "model" / "model.safetensors"))
    ours = read_gguf_weights(out / "model-gguf" / "model.gguf")
    seen = set()
    for linear, fmt in plan["linears"].items():
        layer, hf = int(linear.split(".")[2]), linear.split(".")[-1]
        gname = f"blk.{layer}.{names[hf]}.weight"
        expected = fmt["type"] if fmt.get("kind") == "gguf" else "F16"
        assert types[gname] == expected, (linear, fmt)
        seen.add(expected)
        if hf == "v_proj":  # no row permutation: the stored weights are the fake-quant checkpoint's
            assert torch.equal(torch.from_numpy(ours[gname].astype(np.float32)), fake[f"{linear}.weight"].float())
    assert "F16" in seen and len(seen) >= 2  # the down projections, and at least one quantized type
    assert res["export_packed"]["format"] == "gguf"


def test_a_mixed_plan_over_types_the_export_cannot_hold_is_refused_before_work(tmp_path):
    from omniq_lightning.config import compose
    from omniq_lightning.export import UnsupportedFormat
    from omniq_lightning.pipeline import run

    with pytest.raises(UnsupportedFormat, match="export.format=gguf cannot hold.*not scalar"):
        run(compose(["method=rtn", "quant=mixed", "export.format=gguf", f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(UnsupportedFormat, match="export.format=gptq cannot hold.*not gguf"):
        run(compose(["method=rtn", "quant=gguf_mixed", "export.format=gptq", f"output_dir={tmp_path / 'b'}"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
