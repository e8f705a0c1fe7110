"""Loading the fused CUDA fake-quant extension (``cuda_ext/``), with the reference as fallback.

Order: ``OMNIQ_DISABLE_CUDA_EXT=1`` disables it; a prebuilt ``omniq_lightning_cuda`` module is used
when importable; otherwise the sources are JIT-compiled on first CUDA use and cached by torch
(``TORCH_EXTENSIONS_DIR``). Any failure logs one line and falls back to the pure-PyTorch reference.
"""

from __future__ import annotations

import importlib
import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

EXT_NAME = "omniq_lightning_cuda"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sources_dir() -> Path:
    """Where the kernel sources live: ``OMNIQ_CUDA_EXT_DIR`` or the repository's ``cuda_ext/``."""
    return Path(os.environ.get("OMNIQ_CUDA_EXT_DIR", Path(__file__).resolve().parents[2] / "cuda_ext"))


def disabled() -> bool:
    return os.environ.get("OMNIQ_DISABLE_CUDA_EXT", "0").lower() in ("1", "true", "yes")


@lru_cache(maxsize=1)
def load_extension() -> ModuleType | None:
    """The compiled extension, or None (one log line says why) when it cannot be used."""
    if disabled():
        log.info("omniq-lightning: OMNIQ_DISABLE_CUDA_EXT is set; using the PyTorch reference fake-quant")
        return None
    if not torch.cuda.is_available():
        return None
    try:
        ext = importlib.import_module(EXT_NAME)
        origin = "prebuilt"
    except ImportError:
        try:
            from torch.utils.cpp_extension import load

            src = sources_dir()
            ext = load(
                name=EXT_NAME,
                sources=[str(src / "fake_quant.cu")],
                extra_include_paths=[str(src)],
                extra_cuda_cflags=["-O3", "-std=c++17"],
                extra_cflags=["-O3"],
                verbose=False,
            )
            origin = "JIT-compiled"
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
            log.warning("omniq-lightning: CUDA fake-quant extension unavailable (%s); using the PyTorch reference", exc)
            return None
    log.info("omniq-lightning: using fused CUDA fake-quant kernels (%s)", origin)
    return ext


def usable_for(x: torch.Tensor) -> ModuleType | None:
    """The extension if it can process ``x`` (a CUDA tensor of a supported dtype), else None."""
    if not x.is_cuda or x.dtype not in SUPPORTED_DTYPES:
        return None
    return load_extension()
