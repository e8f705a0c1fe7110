"""Packed checkpoints (compressed-tensors, GPTQ) read back by their consumers, and zero-shot tasks offline."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from omniq_lightning.data import load_corpus, tokenize
from omniq_lightning.eval import perplexity
from omniq_lightning.export import (
    ExportRequest,
    UnsupportedFormat,
    check_export,
    dequantize_ct,
    dequantize_gptq,
    export_dtype,
    load_fake_quant,
    pack_bits,
    unpack_bits,
)
from omniq_lightning.quant import QuantSpec, WeightFormat
from tests.conftest import REPO

QUICK = ["calib.nsamples=8", "eval.max_windows=10", "eval.fp_baseline=false", "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 33, 172])
def test_packing_is_a_dense_little_endian_bitstream(bits, n):
    v = torch.randint(0, 2**bits, (3, n), generator=torch.Generator().manual_seed(n))
    words = pack_bits(v, bits, dim=1)
    assert words.dtype == torch.int32 and words.shape == (3, -(-n * bits // 32))
    assert torch.equal(unpack_bits(words, bits, n, dim=1), v)
    assert torch.equal(unpack_bits(pack_bits(v.T, bits, dim=0), bits, n, dim=0), v.T)
    bitstring = "".join(format(int(x), f"0{bits}b")[::-1] for x in v[0])  # value i at bits [i*b, (i+1)*b)
    for j, word in enumerate(words[0].tolist()):
        assert format(word & 0xFFFFFFFF, "032b")[::-1][: len(bitstring) - 32 * j] == bitstring[32 * j : 32 * j + 32]


def test_formats_refuse_what_they_cannot_hold_and_name_those_that_can():
    def req(**kw):
        spec = QuantSpec(**kw)
        return ExportRequest(spec, frozenset({spec.weight_format}))

    check_export("compressed-tensors", req(w_bits=4, w_group_size=64))
    check_export("gptq", req(w_bits=3))
    with pytest.raises(UnsupportedFormat, match="uniform integer grids only.*Formats that fit: fake"):
        check_export("gptq", req(w_bits=4, w_grid="power"))
    with pytest.raises(UnsupportedFormat, match=r"packs \(4, 8\) bits.*Formats that fit: fake, gptq"):
        check_export("compressed-tensors", req(w_bits=3))
    with pytest.raises(UnsupportedFormat, match="W8A8.*Formats that fit: fake"):
        check_export("compressed-tensors", req(w_bits=4, a_bits=4, kv_bits=16))
    with pytest.raises(UnsupportedFormat, match="KV-cache"):
        check_export("compressed-tensors", req(w_bits=8, a_bits=8, kv_bits=8, w_symmetric=True))
    check_export("compressed-tensors", req(w_bits=8, a_bits=8, w_symmetric=True))
    mixed = ExportRequest(QuantSpec(w_bits=4), frozenset({WeightFormat(4), WeightFormat(2, 64)}))
    with pytest.raises(UnsupportedFormat, match="one weight format per checkpoint.*Formats that fit: fake"):
        check_export("gptq", mixed)
    with pytest.raises(UnsupportedFormat, match="mixture-of-experts"):
        check_export("gptq", ExportRequest(QuantSpec(w_bits=4), frozenset({WeightFormat(4)}), fused_experts=True))


def test_packed_checkpoints_ship_half_precision_unless_told_otherwise():
    assert export_dtype("auto", "bfloat16") == torch.bfloat16 and export_dtype("auto", "float16") == torch.float16
    assert export_dtype("auto", "float32") == torch.float16  # a CPU calibration still ships what serving loads
    assert export_dtype("float32", "bfloat16") == torch.float32
    with pytest.raises(ValueError, match="export.dtype must be auto or one of"):
        export_dtype("fp8", "float16")


def test_an_unfit_export_format_is_refused_before_any_calibration(tmp_path):
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    with pytest.raises(UnsupportedFormat, match="export.format=gptq cannot hold"):
        run(compose(["method=rtn", "quant=w4a4", "export.format=gptq", f"output_dir={tmp_path}"]))
    assert not (tmp_path / "blocks").exists()


@pytest.fixture(scope="module")
def eval_ids(stories, data_dir):
    return tokenize(load_corpus("tinystories", "eval", data_dir), stories.tokenizer)


def exported(tmp_path_factory, method, quant, fmt, *extra):
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    out = tmp_path_factory.mktemp(f"{method}-{quant}-{fmt}")
    res = run(compose([f"method={method}", f"quant={quant}", f"export.format={fmt}", *extra, *QUICK, f"output_dir={out}"]))
    return res, out


def fake_linears(out):
    return {k[: -len(".weight")]: v for k, v in load_file(str(out / "model" / "model.safetensors")).items()
            if k.endswith(".weight") and "layers" in k and "norm" not in k}


CT_CASES = [
    ("rtn", "w4a16", []),  # asymmetric per-channel
    ("gptq", "w4a16", ["quant.w_symmetric=true", "quant.w_group_size=4"]),  # symmetric per-group
    ("omniquant", "w4a16", ["method.epochs=1", "quant.w_group_size=4"]),  # asymmetric per-group, learned clipping
    ("rtn", "w8a8", ["quant.w_symmetric=true", "quant.a_symmetric=true", "quant.kv_bits=16", "quant.w_bits=8"]),
    ("rtn", "w4a16", ["export.dtype=float32"]),  # the fake-quant model's own dtype: scales stored exactly
]


def same_weight(got: torch.Tensor, want: torch.Tensor, dtype: str) -> bool:
    """Bit-exact when the scales are stored in float32; else equal up to the scale's rounding (fp16: 2^-11)."""
    return torch.equal(got, want) if dtype == "float32" else torch.allclose(got, want, rtol=2**-10, atol=1e-6)


@pytest.mark.parametrize("method,quant,extra", CT_CASES,
                         ids=["w4-asym-channel", "w4-sym-g4", "w4-asym-g4-lwc", "w8a8", "w4-asym-channel-fp32"])
def test_compressed_tensors_loads_back_in_transformers(tmp_path_factory, eval_ids, method, quant, extra):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    res, out = exported(tmp_path_factory, method, quant, "compressed-tensors", *extra)
    ppl = res["perplexity"]["tinystories"]["perplexity"]
    packed = out / "model-compressed-tensors"
    cfg = json.loads((packed / "config.json").read_text())["quantization_config"]
    scheme = cfg["config_groups"]["group_0"]
    tensors = load_file(str(packed / "model.safetensors"))
    dtype = json.loads((packed / "config.json").read_text())["dtype"]
    assert dtype == ("float32" if "export.dtype=float32" in extra else "float16")  # auto: fp16 after a CPU run
    assert {str(t.dtype) for k, t in tensors.items() if t.is_floating_point()} == {f"torch.{dtype}"}
    fake = fake_linears(out)
    if quant == "w8a8":
        assert cfg["format"] == "int-quantized" and scheme["input_activations"]["strategy"] == "token"
        for name, w in fake.items():  # int8 weights with a per-channel scale reproduce the fake-quant weights
            assert same_weight(tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"].float(), w, dtype)
    else:
        assert cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
        bits, group = scheme["weights"]["num_bits"], scheme["weights"]["group_size"]
        for name, w in fake.items():  # our own reading of the format: the codes exact, the scales in `dtype`
            assert same_weight(dequantize_ct(tensors, name, group, bits), w, dtype)
    # transformers with compressed-tensors: asymmetric checkpoints load only decompressed (compressed-tensors 0.20)
    model = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, w in fake.items():
        assert same_weight(model.get_submodule(name).weight.float(), w, dtype), name
    if quant == "w8a8":  # the dynamic per-token activation scheme runs in the compressed mode
        model = AutoModelForCausalLM.from_pretrained(packed, dtype=torch.float32)
        ours = load_fake_quant(out / "model").model
        # compressed-tensors' symmetric int8 step is absmax / 127.5, ours absmax / 127: close, not identical
        assert perplexity(model, eval_ids, 256, max_windows=10).perplexity == pytest.approx(
            perplexity(ours, eval_ids, 256, max_windows=10).perplexity, rel=2e-3)
    else:
        assert perplexity(model, eval_ids, 256, max_windows=10).perplexity == pytest.approx(ppl, rel=1e-3)
    assert res["export_packed"]["bytes"] > 0 and res["export_packed"]["fp16_bytes"] > 0


GPTQ_CASES = [("rtn", "w4a16", []), ("gptq", "w2a16", ["quant.w_symmetric=true"]),
              ("gptq", "w4a16", ["quant.w_group_size=4"]), ("rtn", "w8a8", ["quant.w_bits=8", "quant.a_bits=16",
                                                                            "quant.kv_bits=16"])]


@pytest.mark.parametrize("method,quant,extra", GPTQ_CASES, ids=["w4-asym", "w2-sym", "w4-asym-g4", "w8-asym"])
def test_gptq_format_reads_back_exactly(tmp_path_factory, method, quant, extra):
    res, out = exported(tmp_path_factory, method, quant, "gptq", *extra)
    packed = out / "model-gptq"
    cfg = json.loads((packed / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(packed / "model.safetensors"))
    v1 = cfg["checkpoint_format"] == "gptq"
    for name, w in fake_linears(out).items():
        deq = dequantize_gptq(tensors, name, cfg["bits"], v1)
        scales = tensors[f"{name}.scales"]
        assert scales.dtype == torch.float16 and tensors[f"{name}.qweight"].dtype == torch.int32
        # the codes are exact; GPTQ keeps scales in fp16, so the weights differ only by that rounding
        assert torch.allclose(deq, w, rtol=2**-10, atol=1e-6), name


def test_three_bit_gptq_packs_whole_blocks_of_32(tmp_path):
    from omniq_lightning.config import compose
    from omniq_lightning.export.gptq import gptq_tensors
    from omniq_lightning.pipeline import run
    from omniq_lightning.quant import quantize_weight

    w = torch.randn(64, 96)
    q = quantize_weight(w, WeightFormat(3, 32))
    t = gptq_tensors(q, "x", v1=False)
    assert t["x.qweight"].shape == (96 * 3 // 32, 64) and t["x.qzeros"].shape == (3, 64 * 3 // 32)
    assert torch.allclose(dequantize_gptq(t, "x", 3, v1=False), q.dequantize(), rtol=2**-10, atol=1e-6)
    with pytest.raises(UnsupportedFormat, match="blocks of 32"):
        gptq_tensors(quantize_weight(torch.randn(64, 172), WeightFormat(3)), "y", v1=False)
    w3 = QuantSpec(w_bits=3)
    check_export("gptq", ExportRequest(w3, frozenset({w3.weight_format}), shapes=frozenset({(64, 96)})))
    with pytest.raises(UnsupportedFormat, match="blocks of 32.*64x172"):
        check_export("gptq", ExportRequest(w3, frozenset({w3.weight_format}), shapes=frozenset({(64, 172)})))
    # stories260K's MLP is 172 wide: refused before any calibration, nothing written
    with pytest.raises(UnsupportedFormat, match="blocks of 32"):
        run(compose(["method=rtn", "quant=w3a16", "export.format=gptq", f"output_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_gptqmodel_loads_the_gptq_checkpoint_where_it_is_installed(tmp_path_factory, eval_ids):
    """GPTQModel declares torch >= 2.14.1 (the project pins 2.13), so it is not a dev dependency: installed with
    --no-deps beside torch 2.13, its pure-torch kernel loads our checkpoints on the CPU (see RESULTS.md)."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM, GPTQConfig

    res, out = exported(tmp_path_factory, "rtn", "w4a16", "gptq")
    model = AutoModelForCausalLM.from_pretrained(out / "model-gptq", dtype=torch.float16, device_map="cpu",
                                                 quantization_config=GPTQConfig(bits=4, backend="torch"))
    ppl = res["perplexity"]["tinystories"]["perplexity"]
    assert perplexity(model, eval_ids, 256, max_windows=10).perplexity == pytest.approx(ppl, rel=1e-3)


def test_a_resumed_run_exports_the_same_bytes(tmp_path):
    args = [sys.executable, "train.py", "method=omniquant", "quant=w4a16", "method.epochs=2", "export.format=gptq",
            *QUICK, f"output_dir={tmp_path}"]

    def digest():
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return hashlib.sha256((tmp_path / "model-gptq" / "model.safetensors").read_bytes()).hexdigest()

    first = digest()
    (tmp_path / "model-gptq").rename(tmp_path / "first")
    assert digest() == first  # every block resumed from its saved codes


def test_zero_shot_tasks_run_from_local_files(tmp_path):
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    res = run(compose(["method=fp", "eval.tasks=[arc_easy,piqa,hellaswag,lambada_openai,arc_challenge]",
                       "eval.limit=8", "eval.max_windows=2", f"output_dir={tmp_path}", "logger=csv"]))
    zs = json.loads((tmp_path / "results.json").read_text())["zero_shot"]
    assert zs == res["zero_shot"] and set(zs) == {"arc_easy", "arc_challenge", "piqa", "hellaswag", "lambada_openai"}
    for task, r in zs.items():
        assert r["documents"] == 8 and r["limit"] == 8 and r["source"].startswith("local files"), task
        assert 0.0 <= r["acc"] <= 1.0
    assert "acc_norm" in zs["arc_easy"] and "perplexity" in zs["lambada_openai"]
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        run(compose(["method=fp", "eval.tasks=[mmlu_pro]", f"output_dir={tmp_path / 'x'}"]))


def test_local_task_files_reproduce_the_official_prompts(data_dir):
    from omniq_lightning.eval.tasks import arc_rows, hellaswag_rows, piqa_rows

    arc = arc_rows(data_dir / "arc" / "ARC-Easy-Test.jsonl")
    assert len(arc) == 2376 and all(r["answerKey"] in r["choices"]["label"] for r in arc)
    piqa = piqa_rows(data_dir)
    assert len(piqa) == 1838 and {r["label"] for r in piqa} == {0, 1}
    hs = hellaswag_rows(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2")
    assert len(hs) == 10042 and all(len(r["choices"]) == 4 for r in hs)
    assert hs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"  # lm-eval's first query
    assert not any("[" in r["query"] and "]" in r["query"] for r in hs)


def test_roundtrip_benchmark_reads_every_packed_format_back(tmp_path, data_dir):
    """``benchmarks/roundtrip.py`` (the SmolLM2 round trip in RESULTS.md) on a stories260K run exported in both
    packed formats: each loads back with the perplexity the run measured, and a run without one is refused."""
    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    for fmt in ("gptq", "compressed-tensors"):  # the second run loads the first one's finished blocks
        run(compose(["method=rtn", "quant=w4a16", f"export.format={fmt}", *QUICK, f"output_dir={tmp_path}"]))
    report_file = tmp_path / "roundtrip.json"
    done = subprocess.run([sys.executable, "benchmarks/roundtrip.py", str(tmp_path), "--json", str(report_file),
                           "--data-dir", str(data_dir)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(report_file.read_text())
    assert set(report["formats"]) == {"gptq", "compressed-tensors"}
    for fmt, r in report["formats"].items():
        assert 0 < r["fraction_of_fp16"] < 1, fmt
        for how, row in r["loaded"].items():
            assert row["relative_difference"] < 1e-3, (fmt, how)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.json").write_text((tmp_path / "results.json").read_text())
    (bare / "model").symlink_to(tmp_path / "model")
    refused = subprocess.run([sys.executable, "benchmarks/roundtrip.py", str(bare)], cwd=REPO, capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "export.format=" in refused.stderr
