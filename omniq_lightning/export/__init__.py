"""Exports: fake-quant Hugging Face checkpoints, and packed low-bit checkpoints (compressed-tensors, GPTQ, vector-quantized)."""

from omniq_lightning.export.bits import pack_bits, unpack_bits
from omniq_lightning.export.hf import MANIFEST, load_fake_quant, read_manifest, save_fake_quant
from omniq_lightning.export.packed import (
    FORMATS,
    ExportRequest,
    UnsupportedFormat,
    check_export,
    dequantize_ct,
    dequantize_gptq,
    export_dtype,
    write_packed,
)
from omniq_lightning.export.vq import dequantize_vq, load_vq_checkpoint

__all__ = [
    "FORMATS",
    "MANIFEST",
    "ExportRequest",
    "UnsupportedFormat",
    "check_export",
    "dequantize_ct",
    "dequantize_gptq",
    "dequantize_vq",
    "export_dtype",
    "load_vq_checkpoint",
    "load_fake_quant",
    "pack_bits",
    "read_manifest",
    "save_fake_quant",
    "unpack_bits",
    "write_packed",
]
