"""The vector-quantized checkpoint (``export.format=vq``): packed indices and fp16 codebooks in safetensors,
and the torch path that rebuilds the fake-quant model from it, bit for bit.

Per vector-quantized linear ``m`` (``[out, in]``), in place of ``m.weight``:
- ``m.vq.main.indices``: the main codebook's index of every vector, ``[out / v, n_main]`` values of
  ``log2(k)`` bits packed along each row into int32 words (``export.bits.pack_bits``); likewise
  ``m.vq.residual.indices`` and ``m.vq.outlier.indices`` when present;
- ``m.vq.<codebook>.centroids``: fp16 ``[k, v]``;
- ``m.vq.outlier_columns``: int16, the outlier input columns minus 32768 (16 bits for up to 65536 inputs);
- ``m.vq.col_mean`` / ``m.vq.col_std``: fp16 ``[in]`` (normalised formats).
``config.json``'s ``quantization_config`` is ``{"quant_method": "omniq-vq", "config_for_layers": {m: format
and shape}}``; the bias and every other tensor are kept. Vector ``r`` of column ``j`` is rows
``[r*v, (r+1)*v)`` of that column. The stored bytes are those ``VectorFormat.storage_bits`` counts, up to
the padding of each packed row to whole int32 words.

This is this project's own layout (microsoft/VPTQ's checkpoints pack differently and need its kernels);
:func:`load_vq_checkpoint` reads it with plain torch and transformers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from omniq_lightning.export.bits import pack_bits, unpack_bits
from omniq_lightning.export.packed import RENAMED, rewrite_checkpoint
from omniq_lightning.export.registry import Exporter, ExportJob, ExportRequest, register_exporter
from omniq_lightning.quant.spec import VectorFormat
from omniq_lightning.quant.vq import Codebook, VectorQuantizedWeight

VQ_FORMAT = "vq"
QUANT_METHOD = "omniq-vq"
COLUMN_OFFSET = 2**15
CODEBOOKS = ("main", "residual", "outlier")


def vq_tensors(q: VectorQuantizedWeight, prefix: str) -> dict[str, torch.Tensor]:
    """A vector-quantized linear's stored tensors."""
    out = {f"{prefix}.vq.outlier_columns": (q.outlier_columns.to(torch.int32) - COLUMN_OFFSET).to(torch.int16)}
    for tag in CODEBOOKS:
        cb: Codebook | None = getattr(q, tag)
        if cb is not None:
            bits = int(math.log2(cb.centroids.shape[0]))
            out[f"{prefix}.vq.{tag}.indices"] = pack_bits(cb.indices, bits, dim=1)
            out[f"{prefix}.vq.{tag}.centroids"] = cb.centroids.to(torch.float16)
    if q.col_mean is not None:
        out[f"{prefix}.vq.col_mean"] = q.col_mean.to(torch.float16)
        out[f"{prefix}.vq.col_std"] = q.col_std.to(torch.float16)
    return out


def vq_config(quantized: Mapping[str, VectorQuantizedWeight]) -> dict:
    return {"quant_method": QUANT_METHOD, "format_version": 1,
            "config_for_layers": {n: {**q.fmt.to_dict(), "shape": list(q.shape)} for n, q in sorted(quantized.items())}}


class VQExporter(Exporter):
    name = VQ_FORMAT
    kinds = ("vector",)

    def why_not(self, req: ExportRequest) -> str | None:
        if req.fused_experts:
            return "mixture-of-experts checkpoints are exported in the fake-quant format only for now"
        if not req.spec.weight_only:
            return "it holds weight-only quantization"
        return RENAMED if req.renamed_checkpoint else None

    def write(self, job: ExportJob) -> Path:
        return rewrite_checkpoint(job, lambda name, q: vq_tensors(q, name), vq_config(job.codes))


register_exporter(VQExporter())


def read_vq(tensors: Mapping[str, torch.Tensor], prefix: str, layer: Mapping) -> VectorQuantizedWeight:
    """A linear of the checkpoint as stored (``layer``: its config_for_layers entry)."""
    fmt = VectorFormat.from_dict({k: v for k, v in layer.items() if k != "shape"})
    out_f, in_f = (int(x) for x in layer["shape"])
    cols = tensors[f"{prefix}.vq.outlier_columns"].to(torch.int64) + COLUMN_OFFSET
    n_main = in_f - cols.numel()
    vectors = {"main": fmt.vector, "residual": fmt.vector, "outlier": fmt.outlier_vector}
    n_cols = {"main": n_main, "residual": n_main, "outlier": cols.numel()}
    books = {}
    for tag in CODEBOOKS:
        key = f"{prefix}.vq.{tag}.centroids"
        if key in tensors:
            c = tensors[key].float()
            idx = unpack_bits(tensors[f"{prefix}.vq.{tag}.indices"], int(math.log2(c.shape[0])), n_cols[tag], dim=1)
            if idx.shape[0] != out_f // vectors[tag]:
                raise ValueError(f"{prefix}: {tag} indices have {idx.shape[0]} rows, expected {out_f // vectors[tag]}")
            books[tag] = Codebook(c, idx)
    mean = tensors.get(f"{prefix}.vq.col_mean")
    return VectorQuantizedWeight(books["main"], books.get("residual"), books.get("outlier"), cols,
                                 None if mean is None else mean.float(),
                                 None if mean is None else tensors[f"{prefix}.vq.col_std"].float(), fmt, out_f, in_f)


def dequantize_vq(tensors: Mapping[str, torch.Tensor], prefix: str, layer: Mapping) -> torch.Tensor:
    """The float32 weight ``[out, in]`` a linear of the checkpoint holds."""
    return read_vq(tensors, prefix, layer).dequantize()


def load_vq_checkpoint(path: str | os.PathLike, dtype: torch.dtype | None = None, keep_quantized: bool = False):
    """The model a vector-quantized checkpoint holds, with every weight dequantized (plain torch): equal, bit
    for bit, to the fake-quant model it was exported from. ``keep_quantized``: the quantized linears become
    ``VQLinear`` modules instead, which keep the indices and codebooks (CUDA kernels where built)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    qcfg = config.get("quantization_config", {})
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path} is not a vector-quantized checkpoint (quantization_config.quant_method is "
                         f"{qcfg.get('quant_method')!r}, expected {QUANT_METHOD!r})")
    layers = qcfg["config_for_layers"]
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**plain)
    dtype = dtype or getattr(hf_config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    state = {k: v for k, v in tensors.items() if ".vq." not in k}
    for name, layer in layers.items():
        state[f"{name}.weight"] = dequantize_vq(tensors, name, layer).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    if keep_quantized:
        from omniq_lightning.nn.vq_linear import VQLinear

        for name, layer in layers.items():
            bias = tensors.get(f"{name}.bias")
            model.set_submodule(name, VQLinear(read_vq(tensors, name, layer), bias))
    return model.eval()
