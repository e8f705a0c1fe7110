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
# Build flags shared by the JIT build here, the prebuilt wheel (cuda_ext/setup.py) and the CI compile check
# (cuda_ext/check_bindings.py). No -std= flag: torch's cpp_extension then picks the C++ standard its own
# headers need (C++20 for torch >= 2.13); forcing an older one breaks or degrades the build.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3"]


def sources_dir() -> Path:
    """Where the kernel sources live: ``OMNIQ_CUDA_EXT_DIR`` or the repository's ``cuda_ext/``."""
    return Path(os.environ.get("OMNIQ_CUDA_EXT_DIR", Path(__file__).resolve().parents[2] / "cuda_ext"))


def disabled() -> bool:
    return os.environ.get("OMNIQ_DISABLE_CUDA_EXT", "0").lower() in ("1", "true", "yes")


NOT_USED = "not used: no fake-quant ran on a CUDA tensor in this process"
_status = {"fused_kernels": NOT_USED}


def status() -> str:
    """How fake-quant runs on CUDA: "prebuilt", "JIT-compiled", why the reference is used, or that nothing asked
    for it yet (e.g. round-to-nearest weight-only, whose folded weights need no fake-quant) (for results.json)."""
    return _status["fused_kernels"]


@lru_cache(maxsize=1)
def load_extension() -> ModuleType | None:
    """The compiled extension, or None (one log line says why) when it cannot be used."""
    if disabled():
        log.info("omniq-lightning: OMNIQ_DISABLE_CUDA_EXT is set; using the PyTorch reference fake-quant")
        _status["fused_kernels"] = "disabled by OMNIQ_DISABLE_CUDA_EXT"
        return None
    if not torch.cuda.is_available():
        _status["fused_kernels"] = "no CUDA device"
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
                extra_cuda_cflags=NVCC_FLAGS,
                extra_cflags=CXX_FLAGS,
                verbose=False,
            )
            origin = "JIT-compiled"
        except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
            log.warning("omniq-lightning: CUDA fake-quant extension unavailable (%s); using the PyTorch reference", exc)
            _status["fused_kernels"] = f"build failed ({type(exc).__name__}): reference used"
            return None
    log.info("omniq-lightning: using fused CUDA fake-quant kernels (%s)", origin)
    _status["fused_kernels"] = origin
    return ext


def usable_for(x: torch.Tensor) -> ModuleType | None:
    """The extension if it can process ``x`` (a CUDA tensor of a supported dtype), else None."""
    if not x.is_cuda or x.dtype not in SUPPORTED_DTYPES:
        return None
    return load_extension()
