"""Rewriting a fake-quant export as a packed checkpoint: the shared part of every packed exporter.

Packed checkpoints are written from the stored codes kept when each block was folded (never re-derived from
dequantized weights), so a resumed run exports the same bytes. Packing is the dense little-endian bitstream
``export.bits`` implements.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from omniq_lightning.export.registry import ExportJob, ExportRequest
from omniq_lightning.io import plain_modes

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


def rewrite_checkpoint(job: ExportJob, linear_tensors: Callable[[str, Any], dict[str, torch.Tensor]],
                       quantization_config: dict, bias_dtype: torch.dtype | None = None,
                       extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Rewrite ``job.fake_dir`` at ``job.path``: each quantized linear's ``weight`` is replaced by
    ``linear_tensors(module, codes)``, its bias kept in ``bias_dtype`` when given, every other floating tensor
    in ``job.dtype`` (the config says so, with ``quantization_config``); ``extra_tensors`` (kept as they are) go
    in the last shard. Written beside ``job.path`` and renamed when complete."""
    fake_dir, path, quantized = job.fake_dir, job.path, job.codes
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fake_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json",
                                                                  "omniq_*"))
    weight_map: dict[str, str] = {}
    done: set[str] = set()
    shards = sorted(fake_dir.glob("*.safetensors"))
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                module = key[: -len(".weight")] if key.endswith(".weight") else None
                if module in quantized:
                    tensors.update(linear_tensors(module, quantized[module]))
                    done.add(module)
                elif bias_dtype is not None and key.endswith(".bias") and key[: -len(".bias")] in quantized:
                    tensors[key] = f.get_tensor(key).to(bias_dtype)
                else:
                    t = f.get_tensor(key)
                    tensors[key] = t.to(job.dtype) if t.is_floating_point() else t
        if shard == shards[-1]:
            tensors.update(extra_tensors or {})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in tensors})
    missing = sorted(set(quantized) - done)
    if missing:
        raise ValueError(f"quantized linears not found in the checkpoint {fake_dir}: {missing[:5]}")
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = str(job.dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    plain_modes(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


RENAMED = ("the checkpoint transformers saves names this model's text model otherwise than the loaded model (a "
           "multimodal checkpoint), which the packed writers do not map yet: use export.format=fake (or gguf)")


def serving_limits(req: ExportRequest) -> str | None:
    """What the integer-grid serving formats (compressed-tensors, GPTQ) share: uniform grids, per-linear weights
    (no fused experts), the KV cache left to the serving stack, a checkpoint named as the loaded model."""
    if req.renamed_checkpoint:
        return RENAMED
    if any(f.grid != "uniform" for f in req.formats if f.quantized):
        return "it holds uniform integer grids only (this run uses a non-uniform grid)"
    if req.fused_experts:
        return "mixture-of-experts checkpoints are exported in the fake-quant format only for now"
    if req.spec.quantizes_kv:
        return "it has no per-token KV-cache quantization (serving stacks quantize the KV cache themselves)"
    return None


def one_format(codes: Mapping[str, Any]):
    """The single weight format of a checkpoint that holds one."""
    fmts = {q.fmt for q in codes.values()}
    assert len(fmts) == 1, f"one weight format expected, got {sorted(f.name for f in fmts)}"
    return next(iter(fmts))
