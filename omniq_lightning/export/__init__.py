"""Exports: fake-quant Hugging Face checkpoints, and one exporter per packed format (compressed-tensors, GPTQ,
vector-quantized, GGUF), registered in ``export.registry``."""

from omniq_lightning.export import fake  # noqa: F401 - registers export.format=fake first: it always fits
from omniq_lightning.export.bits import pack_bits, unpack_bits
from omniq_lightning.export.compressed_tensors import dequantize_ct
from omniq_lightning.export.gguf import GGUF_FILE
from omniq_lightning.export.gptq import dequantize_gptq
from omniq_lightning.export.hf import MANIFEST, load_fake_quant, read_manifest, save_fake_quant
from omniq_lightning.export.packed import export_dtype
from omniq_lightning.export.registry import (
    EXPORTERS,
    Exporter,
    ExportJob,
    ExportRequest,
    UnsupportedFormat,
    check_export,
    register_exporter,
    write_export,
)
from omniq_lightning.export.vq import dequantize_vq, load_vq_checkpoint

__all__ = [
    "EXPORTERS",
    "GGUF_FILE",
    "MANIFEST",
    "ExportJob",
    "ExportRequest",
    "Exporter",
    "UnsupportedFormat",
    "check_export",
    "dequantize_ct",
    "dequantize_gptq",
    "dequantize_vq",
    "export_dtype",
    "load_fake_quant",
    "load_vq_checkpoint",
    "pack_bits",
    "read_manifest",
    "register_exporter",
    "save_fake_quant",
    "unpack_bits",
    "write_export",
]
