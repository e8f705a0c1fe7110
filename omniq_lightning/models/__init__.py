"""Architecture adapters: the only code that knows a model family's internals."""

from __future__ import annotations

from omniq_lightning.models.base import BlockContext, ModelAdapter, ModelSites, ResidualWriters
from omniq_lightning.models.gemma import Gemma2Adapter, GemmaAdapter
from omniq_lightning.models.llama import LlamaAdapter
from omniq_lightning.models.loading import LoadedModel, ModelSource, resolve_source
from omniq_lightning.models.loading import load_model as _load_model
from omniq_lightning.models.loading import meta_model as _meta_model
from omniq_lightning.models.moe import MoEAdapter
from omniq_lightning.models.opt import OPTAdapter
from omniq_lightning.models.phi3 import Phi3Adapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, GemmaAdapter, Gemma2Adapter, Phi3Adapter, MoEAdapter,
                                            OPTAdapter)


def supported_model_types() -> list[str]:
    return [t for cls in ADAPTERS for t in cls.model_types]


def gguf_model_types() -> list[str]:
    """The model types whose adapters name a GGUF layout (``ModelAdapter.gguf_archs``)."""
    return [t for cls in ADAPTERS for t in cls.model_types if t in cls.gguf_archs]


def adapter_for(model_type: str) -> ModelAdapter:
    """The adapter of a Hugging Face ``model_type``; an unsupported one lists the supported types."""
    for cls in ADAPTERS:
        if cls.supports(model_type):
            return cls()
    raise ValueError(
        f"unsupported architecture: model_type '{model_type}'. Supported model types: "
        f"{', '.join(supported_model_types())}. Adding a family means adding an adapter in omniq_lightning/models/"
    )


def load_model(path: str, **kwargs) -> LoadedModel:
    """Load a model, its tokenizer and its adapter (see :func:`omniq_lightning.models.loading.load_model`)."""
    return _load_model(path, adapter_for=adapter_for, **kwargs)


def meta_model(path: str, **kwargs):
    """A model's structure from its config alone, on the meta device, and its adapter (see
    :func:`omniq_lightning.models.loading.meta_model`)."""
    return _meta_model(path, adapter_for=adapter_for, **kwargs)


__all__ = [
    "ADAPTERS",
    "gguf_model_types",
    "BlockContext",
    "Gemma2Adapter",
    "GemmaAdapter",
    "LlamaAdapter",
    "LoadedModel",
    "MoEAdapter",
    "ModelAdapter",
    "ModelSites",
    "ResidualWriters",
    "ModelSource",
    "OPTAdapter",
    "Phi3Adapter",
    "adapter_for",
    "load_model",
    "meta_model",
    "resolve_source",
    "supported_model_types",
]
