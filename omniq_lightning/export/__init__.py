"""Exports: fake-quant Hugging Face checkpoints (packed low-bit formats come later)."""

from omniq_lightning.export.hf import MANIFEST, load_fake_quant, read_manifest, save_fake_quant

__all__ = ["MANIFEST", "load_fake_quant", "read_manifest", "save_fake_quant"]
