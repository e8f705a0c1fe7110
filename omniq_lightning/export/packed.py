"""Packed low-bit checkpoints that serving stacks load: compressed-tensors and GPTQ (and this project's vector-
quantized layout, ``export/vq.py``).

Both are written from the integer codes kept when each block was folded (``QuantizedWeight``: never
re-derived from dequantized weights), so a resumed run exports the same bytes.

* **compressed-tensors** (transformers with the ``compressed-tensors`` package, vLLM):
  - weight-only int4 / int8, symmetric or asymmetric, per group or per channel: ``pack-quantized``,
    per linear ``weight_packed`` (int32 ``[out, ceil(in*b/32)]``), ``weight_scale`` ``[out, groups]``,
    ``weight_zero_point`` (asymmetric: int32, packed along the output dimension) and ``weight_shape``;
    a mixed-precision plan becomes one config group per weight format;
  - W8A8 with dynamic per-token input activations (what vLLM runs): ``int-quantized``, int8 ``weight``
    and ``weight_scale`` ``[out, 1]`` (symmetric per-channel weights).
  compressed-tensors codes are signed (``q - 2^(b-1)``, zero points likewise); stored, they are shifted
  back by ``2^(b-1)``: exactly our unsigned codes.
* **GPTQ** (transformers with optimum + GPTQModel, vLLM): ``qweight`` (codes packed along the input
  dimension), ``qzeros`` (packed along the output dimension; GPTQ's v1 convention stores ``zero - 1``,
  so an asymmetric checkpoint whose zero points reach 0 is written as ``gptq_v2``), fp16 ``scales``,
  ``g_idx``; 2, 3, 4 and 8 bits (3 bits: widths multiple of 32).

Packing is the dense little-endian bitstream both use: value ``i`` of a row occupies bits
``[i*b, (i+1)*b)`` of the row's int32 words, spilling into the next word when 32 is not a multiple of b.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omniq_lightning.export.bits import pack_bits, unpack_bits
from omniq_lightning.export.vq import VQ_FORMAT, vq_config, vq_tensors
from omniq_lightning.quant import QuantizedWeight, QuantSpec, WeightFormat
from omniq_lightning.quant.spec import VectorFormat
from omniq_lightning.quant.vq import VectorQuantizedWeight

FORMATS = ("fake", "compressed-tensors", "gptq", VQ_FORMAT)
CT_BITS, GPTQ_BITS = (4, 8), (2, 3, 4, 8)


# ---- what each format can hold ------------------------------------------------------------------------------------


class UnsupportedFormat(ValueError):
    pass


@dataclass(frozen=True)
class ExportRequest:
    """What is being exported: the run's spec, every linear's weight format (a mixed plan may differ per
    linear) and whether the model has MoE experts."""

    spec: QuantSpec
    formats: frozenset[WeightFormat]
    moe: bool = False


def fitting_formats(req: ExportRequest) -> list[str]:
    return [f for f in FORMATS if not why_not(f, req)]


def why_not(fmt: str, req: ExportRequest) -> str | None:
    """Why ``fmt`` cannot hold this quantization (None if it can)."""
    if fmt == "fake":
        return None
    spec = req.spec
    formats = {f for f in req.formats if f.quantized}
    if not formats:
        return "the weights are not quantized"
    vector = {f for f in formats if isinstance(f, VectorFormat)}
    if fmt == VQ_FORMAT:
        if vector != formats:
            return "it holds vector-quantized weights only (method=vptq with quant=vq2, vq3 or vq4)"
        if req.moe:
            return "mixture-of-experts checkpoints are exported in the fake-quant format only for now"
        if not spec.weight_only:
            return "it holds weight-only quantization"
        return None
    if vector:
        return f"it holds scalar integer grids (vector-quantized weights export as export.format={VQ_FORMAT})"
    if any(f.grid != "uniform" for f in formats):
        return "it holds uniform integer grids only (this run uses a non-uniform grid)"
    if req.moe:
        return "mixture-of-experts checkpoints are exported in the fake-quant format only for now"
    if spec.quantizes_kv:
        return "it has no per-token KV-cache quantization (serving stacks quantize the KV cache themselves)"
    if fmt == "compressed-tensors":
        if spec.quantizes_activations:
            w8a8 = (spec.a_bits == 8 and spec.a_granularity == "token" and
                    all(f.bits == 8 and f.symmetric and f.group_size is None for f in formats))
            if not w8a8:
                return ("its weight-activation scheme is W8A8: 8-bit symmetric per-channel weights with dynamic "
                        "per-token 8-bit activations (quant.w_symmetric=true, per-channel)")
        elif any(f.bits not in CT_BITS for f in formats):
            return f"it packs {CT_BITS} bits (what vLLM and transformers run)"
        return None
    if spec.quantizes_activations:
        return "it holds weight-only quantization"
    if len(formats) > 1:
        return "it holds one weight format per checkpoint (this plan mixes several)"
    if any(f.bits not in GPTQ_BITS for f in formats):
        return f"it packs {GPTQ_BITS} bits"
    return None


def check_export(fmt: str, req: ExportRequest) -> None:
    """Refuse a format that cannot hold this quantization, naming the formats that can."""
    if fmt not in FORMATS:
        raise ValueError(f"export.format must be one of {FORMATS}, got {fmt!r}")
    reason = why_not(fmt, req)
    if reason:
        raise UnsupportedFormat(f"export.format={fmt} cannot hold this quantization: {reason}. Formats that fit: "
                                f"{', '.join(fitting_formats(req))}")


# ---- tensors per linear ---------------------------------------------------------------------------------------------


def ct_tensors(q: QuantizedWeight, prefix: str, dtype: torch.dtype, w8a8: bool) -> dict[str, torch.Tensor]:
    """A linear's compressed-tensors tensors (see the module docstring)."""
    f = q.fmt
    offset = 2 ** (f.bits - 1)
    if w8a8:
        return {f"{prefix}.weight": (q.codes.to(torch.int16) - offset).to(torch.int8),
                f"{prefix}.weight_scale": q.scale.to(dtype)}
    out = {f"{prefix}.weight_packed": pack_bits(q.codes, f.bits, dim=1), f"{prefix}.weight_scale": q.scale.to(dtype),
           f"{prefix}.weight_shape": torch.tensor(q.shape, dtype=torch.int64)}
    if not f.symmetric:
        out[f"{prefix}.weight_zero_point"] = pack_bits(q.zero.round().to(torch.int64), f.bits, dim=0)
    return out


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


def ct_scheme(f: WeightFormat, spec: QuantSpec) -> dict:
    weights = {"num_bits": f.bits, "type": "int", "symmetric": f.symmetric, "dynamic": False,
               "strategy": "group" if f.group_size else "channel", "group_size": f.group_size, "actorder": None}
    acts = None
    if spec.quantizes_activations:
        acts = {"num_bits": spec.a_bits, "type": "int", "symmetric": spec.a_symmetric, "dynamic": True,
                "strategy": "token", "group_size": None}
    return {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None,
            "format": "int-quantized" if acts else "pack-quantized"}


def ct_config(quantized: Mapping[str, QuantizedWeight], spec: QuantSpec) -> dict:
    """compressed-tensors' ``quantization_config``: one config group per weight format (targets: its modules)."""
    groups: dict[WeightFormat, list[str]] = {}
    for name, q in quantized.items():
        groups.setdefault(q.fmt, []).append(name)
    config_groups = {}
    for i, (f, names) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].name)):
        scheme = ct_scheme(f, spec)
        if len(groups) > 1:
            scheme["targets"] = [f"re:^{re.escape(n)}$" for n in sorted(names)]
        config_groups[f"group_{i}"] = scheme
    fmt = next(iter(config_groups.values()))["format"]
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ["lm_head"], "kv_cache_scheme": None,
            "sparsity_config": {}, "transform_config": {}, "version": _ct_version()}


def gptq_config(f: WeightFormat, v1: bool) -> dict:
    return {"quant_method": "gptq", "bits": f.bits, "group_size": f.group_size or -1, "desc_act": False,
            "sym": f.symmetric, "checkpoint_format": "gptq" if v1 else "gptq_v2", "pack_dtype": "int32",
            "true_sequential": True, "static_groups": False, "damp_percent": 0.01, "lm_head": False}


def _ct_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # noqa: BLE001 - the format does not need the package to be written
        return "0.20.0"


# ---- the checkpoint --------------------------------------------------------------------------------------------------

EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_dtype(setting: str, model_dtype: str) -> torch.dtype:
    """The dtype of a packed checkpoint's unquantized tensors (embeddings, norms, head, compressed-tensors scales):
    ``export.dtype``, or with ``auto`` the model's own half-precision dtype, and float16 for a float32
    calibration (as on a CPU): what serving stacks load."""
    if setting == "auto":
        return EXPORT_DTYPES[model_dtype] if model_dtype in ("float16", "bfloat16") else torch.float16
    if setting not in EXPORT_DTYPES:
        raise ValueError(f"export.dtype must be auto or one of {sorted(EXPORT_DTYPES)}, got {setting!r}")
    return EXPORT_DTYPES[setting]


def write_packed(fake_dir: str | os.PathLike, quantized: Mapping[str, QuantizedWeight | VectorQuantizedWeight],
                 spec: QuantSpec, fmt: str, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
    """Rewrite a fake-quant export (``fake_dir``: the model's own layout, config, tokenizer) as a ``fmt``
    checkpoint at ``path``: each quantized linear's ``weight`` is replaced by its packed tensors (from
    ``quantized``, keyed by the module's name in the model), every other floating tensor is kept in ``dtype``
    (the config says so). Written beside ``path`` and renamed when complete."""
    fake_dir, path = Path(fake_dir), Path(path)
    check_export(fmt, ExportRequest(spec, frozenset(q.fmt for q in quantized.values())))
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fake_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json",
                                                                  "omniq_*"))
    v1 = fmt == "gptq" and all(q.fmt.symmetric or bool((q.zero >= 1).all()) for q in quantized.values())
    w8a8 = fmt == "compressed-tensors" and spec.quantizes_activations
    weight_map: dict[str, str] = {}
    done: set[str] = set()
    for shard in sorted(fake_dir.glob("*.safetensors")):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                module = key[: -len(".weight")] if key.endswith(".weight") else None
                if module in quantized:
                    q = quantized[module]
                    if fmt == VQ_FORMAT:
                        tensors.update(vq_tensors(q, module))
                    elif fmt == "gptq":
                        tensors.update(gptq_tensors(q, module, v1))
                    else:
                        tensors.update(ct_tensors(q, module, dtype, w8a8))
                    done.add(module)
                elif fmt == "gptq" and key.endswith(".bias") and key[: -len(".bias")] in quantized:
                    tensors[key] = f.get_tensor(key).to(torch.float16)
                else:
                    t = f.get_tensor(key)
                    tensors[key] = t.to(dtype) if t.is_floating_point() else t
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in tensors})
    missing = sorted(set(quantized) - done)
    if missing:
        raise ValueError(f"quantized linears not found in the checkpoint {fake_dir}: {missing[:5]}")
    if len(list(fake_dir.glob("*.safetensors"))) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    fmts = {q.fmt for q in quantized.values()}
    if fmt == VQ_FORMAT:
        config["quantization_config"] = vq_config(quantized)
    elif fmt == "gptq":
        config["quantization_config"] = gptq_config(next(iter(fmts)), v1)
    else:
        config["quantization_config"] = ct_config(quantized, spec)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


# ---- reading them back (independent reference dequantizers, from the formats' definitions) ---------------------------


def dequantize_ct(tensors: Mapping[str, torch.Tensor], prefix: str, group_size: int | None, bits: int) -> torch.Tensor:
    """The float weight a compressed-tensors pack-quantized linear holds: ``(q - zp) * scale`` per group."""
    out_f, in_f = (int(x) for x in tensors[f"{prefix}.weight_shape"])
    q = unpack_bits(tensors[f"{prefix}.weight_packed"], bits, in_f, dim=1) - 2 ** (bits - 1)
    scale = tensors[f"{prefix}.weight_scale"].float()
    zp_key = f"{prefix}.weight_zero_point"
    zp = (unpack_bits(tensors[zp_key], bits, out_f, dim=0) - 2 ** (bits - 1)) if zp_key in tensors else 0
    g = group_size or in_f
    w = (q.reshape(out_f, in_f // g, g) - (zp if isinstance(zp, int) else zp[..., None])) * scale[..., None]
    return w.reshape(out_f, in_f)


def dequantize_gptq(tensors: Mapping[str, torch.Tensor], prefix: str, bits: int, v1: bool) -> torch.Tensor:
    """The float weight ``[out, in]`` a GPTQ linear holds: ``scales[g] * (q - zeros[g])`` with ``g = g_idx``."""
    scales = tensors[f"{prefix}.scales"].float()
    g_idx = tensors[f"{prefix}.g_idx"].long()
    out_f, in_f = scales.shape[1], g_idx.numel()
    q = unpack_bits(tensors[f"{prefix}.qweight"], bits, in_f, dim=0)  # [in, out]
    zeros = unpack_bits(tensors[f"{prefix}.qzeros"], bits, out_f, dim=1) + (1 if v1 else 0)  # [groups, out]
    return (scales[g_idx] * (q - zeros[g_idx])).T
