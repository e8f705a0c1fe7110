"""Quantization methods, one file each, sharing the `Method` interface."""

from __future__ import annotations

from typing import Any

from omniq_lightning.methods.awq import AWQ
from omniq_lightning.methods.base import Method
from omniq_lightning.methods.gptq import GPTQ
from omniq_lightning.methods.omniquant import OmniQuant
from omniq_lightning.methods.rptq import RPTQ
from omniq_lightning.methods.rtn import RTN
from omniq_lightning.methods.smoothquant import SmoothQuant
from omniq_lightning.methods.vptq import VPTQ
from omniq_lightning.transforms import BlockPlan

# Keys of a method config that the pipeline reads rather than the method.
NON_METHOD_KEYS = ("name", "tag", "batch_size")

METHODS: dict[str, type[Method]] = {
    "rtn": RTN, "gptq": GPTQ, "awq": AWQ, "smoothquant": SmoothQuant, "omniquant": OmniQuant, "rptq": RPTQ,
    "vptq": VPTQ,
}


def build_method(name: str, settings: dict[str, Any]) -> Method:
    """The method named ``name`` configured from ``settings`` (the ``method`` config node)."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; available methods: fp, {', '.join(METHODS)}")
    params = {k: v for k, v in settings.items() if k not in NON_METHOD_KEYS}
    try:
        return METHODS[name](**params)
    except TypeError as exc:
        raise ValueError(f"bad settings for method '{name}' ({exc}); given: {sorted(params)}") from exc


__all__ = ["AWQ", "GPTQ", "METHODS", "RPTQ", "RTN", "BlockPlan", "Method", "OmniQuant", "SmoothQuant", "VPTQ", "build_method"]
