"""Quantization methods, one file each, sharing the `Method` interface; each is built from its config's
``_target_`` (``configs/method/*.yaml``)."""

from __future__ import annotations

import importlib
from typing import Any

from omniq_lightning.methods.awq import AWQ
from omniq_lightning.methods.base import DataNeeds, Method, ModelTraits
from omniq_lightning.methods.gptq import GPTQ
from omniq_lightning.methods.omniquant import OmniQuant
from omniq_lightning.methods.rptq import RPTQ
from omniq_lightning.methods.rtn import RTN
from omniq_lightning.methods.smoothquant import SmoothQuant
from omniq_lightning.methods.vptq import VPTQ


def build_method(settings: dict[str, Any]) -> Method:
    """The method a ``method`` config describes: its ``_target_`` class called with every other key."""
    target = settings.get("_target_")
    label = settings.get("name", "?")
    if not target:
        raise ValueError(f"method config '{label}' has no _target_ (the Method class to build, e.g. "
                         "omniq_lightning.methods.OmniQuant)")
    module, _, attr = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"method '{label}': _target_ {target!r} cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"method '{label}': _target_ {target!r} is not a Method")
    params = {k: v for k, v in settings.items() if k != "_target_"}
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad settings for method '{label}' ({exc}); given: {sorted(params)}") from exc


__all__ = ["AWQ", "GPTQ", "RPTQ", "RTN", "VPTQ", "DataNeeds", "Method", "ModelTraits", "OmniQuant", "SmoothQuant",
           "build_method"]
