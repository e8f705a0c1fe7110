"""GPTQ checkpoints (transformers with optimum + GPTQModel, vLLM): ``qweight`` (codes packed along the input
dimension), ``qzeros`` (packed along the output dimension; GPTQ's v1 convention stores ``zero - 1``, so an
asymmetric checkpoint whose zero points reach 0 is written as ``gptq_v2``), fp16 ``scales``, ``g_idx``; 2, 3, 4
and 8 bits (3 bits: widths multiple of 32)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from omniq_lightning.export.bits import pack_bits, unpack_bits
from omniq_lightning.export.packed import one_format, rewrite_checkpoint, serving_limits
from omniq_lightning.export.registry import Exporter, ExportJob, ExportRequest, UnsupportedFormat, register_exporter
from omniq_lightning.quant import QuantizedWeight, WeightFormat

GPTQ_BITS = (2, 3, 4, 8)


def gptq_tensors(q: QuantizedWeight, prefix: str, v1: bool) -> dict[str, torch.Tensor]:
    """A linear's GPTQ tensors: codes and zero points packed, fp16 scales, the group of every input column."""
    f = q.fmt
    out_f, in_f = q.shape
    if f.bits == 3 and (in_f % 32 or out_f % 32):
        raise UnsupportedFormat(f"3-bit GPTQ packs whole blocks of 32 values: {prefix} is {out_f}x{in_f}")
    zeros = q.zero.round().to(torch.int64) - (1 if v1 else 0)
    return {
        f"{prefix}.qweight": pack_bits(q.codes.T, f.bits, dim=0),
        f"{prefix}.qzeros": pack_bits(zeros.T, f.bits, dim=1),
        f"{prefix}.scales": q.scale.T.to(torch.float16).contiguous(),
        f"{prefix}.g_idx": (torch.arange(in_f) // (f.group_size or in_f)).to(torch.int32),
    }


def gptq_config(f: WeightFormat, v1: bool) -> dict:
    return {"quant_method": "gptq", "bits": f.bits, "group_size": f.group_size or -1, "desc_act": False,
            "sym": f.symmetric, "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32",
            "true_sequential": True, "static_groups": False, "damp_percent": 0.01, "lm_head": False}


class GPTQExporter(Exporter):
    name = "gptq"
    kinds = ("scalar",)

    def why_not(self, req: ExportRequest) -> str | None:
        spec, formats = req.spec, {f for f in req.formats if f.quantized}
        reason = serving_limits(req)
        if reason:
            return reason
        if spec.quantizes_activations:
            return "it holds weight-only quantization"
        if len(formats) > 1:
            return "it holds one weight format per checkpoint (this plan mixes several)"
        if any(f.bits not in GPTQ_BITS for f in formats):
            return f"it packs {GPTQ_BITS} bits"
        odd = sorted(s for s in req.shapes if s[0] % 32 or s[1] % 32)
        if any(f.bits == 3 for f in formats) and odd:
            return (f"3-bit GPTQ packs whole blocks of 32 values, and this model has linears of {odd[0][0]}x{odd[0][1]} "
                    "(widths not multiples of 32)")
        return None

    def write(self, job: ExportJob) -> Path:
        v1 = all(q.fmt.symmetric or bool((q.zero >= 1).all()) for q in job.codes.values())
        return rewrite_checkpoint(job, lambda name, q: gptq_tensors(q, name, v1), gptq_config(one_format(job.codes), v1),
                                  bias_dtype=torch.float16)


register_exporter(GPTQExporter())


def dequantize_gptq(tensors: Mapping[str, torch.Tensor], prefix: str, bits: int, v1: bool) -> torch.Tensor:
    """The float weight ``[out, in]`` a GPTQ linear holds: ``scales[g] * (q - zeros[g])`` with ``g = g_idx``."""
    scales = tensors[f"{prefix}.scales"].float()
    g_idx = tensors[f"{prefix}.g_idx"].long()
    out_f, in_f = scales.shape[1], g_idx.numel()
    q = unpack_bits(tensors[f"{prefix}.qweight"], bits, in_f, dim=0)  # [in, out]
    zeros = unpack_bits(tensors[f"{prefix}.qzeros"], bits, out_f, dim=1) + (1 if v1 else 0)  # [groups, out]
    return (scales[g_idx] * (q - zeros[g_idx])).T
