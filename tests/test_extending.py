"""Adding is new code only: a weight format kind and an exporter registered from this file (no core file edited)
run through the pipeline end to end; the input-transform slots of QuantLinear and QuantMatMul; the sites an
adapter declares for whole-model passes; one clean log."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omniq_lightning.export import Exporter, ExportJob, ExportRequest, register_exporter
from omniq_lightning.nn import QuantLinear, QuantMatMul
from omniq_lightning.nn.formats import FormatKind, register_format_kind
from omniq_lightning.nn.weight import WeightQuantizerBase
from omniq_lightning.quant import QuantSpec
from tests.conftest import QUICK, REPO

# ---- a new weight format kind: binary weights, sign(w) times one scale per output row -----------------------------


@dataclass(frozen=True)
class BinaryFormat:
    kind: ClassVar[str] = "binary"
    quantized: ClassVar[bool] = True
    scale_bits: int = 16

    @property
    def name(self) -> str:
        return "binary"

    def validate_shape(self, out_features: int, in_features: int) -> None:
        if in_features > 2**20:
            raise ValueError(f"binary weights up to 2^20 inputs, got {in_features}")

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return out_features * in_features + out_features * self.scale_bits

    def to_dict(self) -> dict:
        return {"kind": self.kind, "scale_bits": self.scale_bits}


@dataclass
class BinaryCodes:
    signs: torch.Tensor  # bool [out, in]: w >= 0
    scale: torch.Tensor  # float32 [out, 1]
    fmt: BinaryFormat

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.signs.shape)

    def dequantize(self) -> torch.Tensor:
        return (self.signs.float() * 2 - 1) * self.scale

    def to(self, device) -> BinaryCodes:
        return BinaryCodes(self.signs.to(device), self.scale.to(device), self.fmt)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.signs": self.signs, f"{prefix}.scale": self.scale}

    @classmethod
    def from_tensors(cls, t, prefix: str, fmt: BinaryFormat) -> BinaryCodes:
        return cls(t[f"{prefix}.signs"], t[f"{prefix}.scale"], fmt)


class BinaryQuantizer(WeightQuantizerBase):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = self.quantize(w.detach()).dequantize().to(w.dtype)
        return w + (q - w).detach()  # straight-through

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> BinaryCodes:
        w = w.float()
        return BinaryCodes(w >= 0, w.abs().mean(1, keepdim=True), self.fmt)


register_format_kind(FormatKind("binary", BinaryFormat, BinaryCodes,
                                lambda fmt, out_f, in_f, spec, device: BinaryQuantizer(fmt), frozenset({"quantizer"})))


# ---- a new exporter: the signs packed 8 to a byte -------------------------------------------------------------------


class BinaryExporter(Exporter):
    name = "binary"
    kinds = ("binary",)

    def why_not(self, req: ExportRequest) -> str | None:
        return None if req.spec.weight_only else "it holds weight-only quantization"

    def write(self, job: ExportJob) -> Path:
        job.path.mkdir(parents=True, exist_ok=True)
        weights = {n: torch.from_numpy(np.packbits(q.signs.cpu().numpy(), axis=1)) for n, q in job.codes.items()}
        scales = {f"{n}.scale": q.scale.to(job.dtype) for n, q in job.codes.items()}
        save_file({**{f"{n}.signs": v for n, v in weights.items()}, **scales}, str(job.path / "binary.safetensors"))
        (job.path / "layers.json").write_text(json.dumps({n: list(q.shape) for n, q in job.codes.items()}))
        return job.path


register_exporter(BinaryExporter())


def read_binary(path: Path) -> dict[str, torch.Tensor]:
    t, shapes = load_file(str(path / "binary.safetensors")), json.loads((path / "layers.json").read_text())
    out = {}
    for name, (_, i) in shapes.items():
        signs = torch.from_numpy(np.unpackbits(t[f"{name}.signs"].numpy(), axis=1)[:, :i].astype(bool))
        out[name] = (signs.float() * 2 - 1) * t[f"{name}.scale"].float()
    return out


def test_a_format_kind_and_an_exporter_registered_here_run_end_to_end(tmp_path, stories_dir):
    from transformers import AutoModelForCausalLM

    from omniq_lightning.config import compose
    from omniq_lightning.pipeline import run

    res = run(compose(["method=rtn", "+quant.w_format={kind:binary}", "export.format=binary", *QUICK,
                       f"output_dir={tmp_path}"]))
    assert res["quant"]["name"] == "binary"
    widths = [(64, 64)] * 4 + [(172, 64)] * 2 + [(64, 172)]  # q, k (GQA: 32 rows), v, o; gate, up; down
    widths[1] = widths[2] = (32, 64)
    n = sum(o * i for o, i in widths)
    assert res["bits_per_weight"] == pytest.approx(round((n + 16 * sum(o for o, _ in widths)) / n, 4))
    assert res["export_packed"]["format"] == "binary"
    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    for name, w in read_binary(tmp_path / "model-binary").items():  # the packed signs and fp16 scales
        ref = fake.get_submodule(name).weight
        torch.testing.assert_close(w, ref, rtol=2**-10, atol=0)
        assert set(torch.unique(ref.abs() / ref.abs().amax(1, keepdim=True)).tolist()) == {1.0}
    assert res["perplexity"]["tinystories"]["perplexity"] > 1.0
    with pytest.raises(ValueError, match="binary.*lacks what method=gptq needs \\(columns\\)"):
        run(compose(["method=gptq", "+quant.w_format={kind:binary}", f"output_dir={tmp_path / 'gptq'}"]))
    with pytest.raises(ValueError, match="export.format=gptq cannot hold.*holds scalar weight formats, not binary.*"
                                         "Formats that fit: fake, binary"):
        run(compose(["method=rtn", "+quant.w_format={kind:binary}", "export.format=gptq", f"output_dir={tmp_path / 'g'}"]))


# ---- input-transform slots ------------------------------------------------------------------------------------------


class Rotate(nn.Module):
    """x -> x R^T for an orthogonal R (float64 reference below)."""

    def __init__(self, r: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("r", r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.r.T.to(x.dtype)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_a_linear_with_an_online_rotation_computes_the_same_function():
    """W x = (W R^T)(R x): the weight holds R's inverse, the slot applies R online (before the input quantizer)."""
    lin = nn.Linear(48, 32).double()
    x = torch.randn(5, 7, 48, dtype=torch.float64)
    r = orthogonal(48, 0)
    ql = QuantLinear(lin, QuantSpec(w_bits=16, lwc=False))
    ql.weight.data = lin.weight.data @ r.T
    ql.input_transform = Rotate(r)
    torch.testing.assert_close(ql(x), lin(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(AssertionError, match="transforms its input"):
        ql.fold()
        ql.to_linear()
    xs = x.clone().requires_grad_(True)  # gradients flow through the slot
    ql(xs).sum().backward()
    ref = x.clone().requires_grad_(True)
    lin(ref).sum().backward()
    torch.testing.assert_close(xs.grad, ref.grad, rtol=1e-12, atol=1e-12)


class RotateQK(nn.Module):
    def __init__(self, r: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("r", r)

    def forward(self, q, k, v):
        return q @ self.r.T.to(q.dtype), k @ self.r.T.to(k.dtype), v


def test_attention_with_an_online_rotation_of_q_and_k_is_unchanged():
    """q.k = (Rq).(Rk) for an orthogonal R per head: the slot of QuantMatMul rotates them after RoPE."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(0)
    module = nn.Module()
    module.num_key_value_groups, module.training = 1, False
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    plain = QuantMatMul(16, 16, False, eager_attention_forward)
    rotated = copy.deepcopy(plain)
    rotated.input_transform = RotateQK(orthogonal(8, 1))
    a, _ = plain(module, q, k, v, None, scaling=0.5, dropout=0.0)
    b, _ = rotated(module, q, k, v, None, scaling=0.5, dropout=0.0)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- model-level sites ----------------------------------------------------------------------------------------------


def test_adapters_declare_the_model_level_sites(stories):
    sites = stories.adapter.model_sites(stories.model)
    model = stories.model
    assert model.get_submodule(sites.embedding) is model.get_input_embeddings()
    assert model.get_submodule(sites.head) is model.get_output_embeddings()
    assert isinstance(model.get_submodule(sites.final_norm), nn.Module)
    assert sites.tied  # stories260K ties its embedding and head


# ---- one run, one clean log -----------------------------------------------------------------------------------------


def test_a_run_prints_no_lightning_banner(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "quant=w4a16", "method.epochs=1", "calib.nsamples=4",
                           "eval.max_windows=2", "eval.fp_baseline=false", f"output_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    for banner in ("GPU available", "TPU available", "litlogger", "in eval mode", "LeafSpec", "`Trainer.fit` stopped"):
        assert banner not in log, banner
    assert "omniq-lightning: stories260k / omniquant w4a16" in log
