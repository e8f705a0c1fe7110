"""omniq-lightning: post-training quantization of LLMs (OmniQuant LWC + LET) on PyTorch Lightning."""

__version__ = "0.1.0"
