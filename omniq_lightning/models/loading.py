"""Loading models and tokenizers from a local folder, a GGUF file or a Hugging Face hub id."""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from omniq_lightning.models.base import ModelAdapter
from omniq_lightning.models.lazy import LazyWeights, build_lazily

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    location: str  # a local folder or a hub id
    gguf_file: str | None
    local: bool


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    source: ModelSource
    weights: LazyWeights | None = None  # a lazily held model's checkpoint (``model.lazy``); None: loaded whole

    @property
    def lazy(self) -> bool:
        return self.weights is not None

    def read_block(self, i: int) -> nn.Module:
        """Block ``i`` with real weights: the model's own block, or for a lazily held model a copy read from the
        checkpoint's shards (the model's block stays on the meta device)."""
        block = self.adapter.blocks(self.model)[i]
        if self.weights is None:
            return block
        return self.weights.materialize(copy.deepcopy(block), f"{self.adapter.blocks_prefix(self.model)}.{i}.")

    @contextlib.contextmanager
    def head_loaded(self) -> Iterator[None]:
        """While active, a lazily held model's head (untied) has its weights, read from the checkpoint and given
        back to the meta device after."""
        name = self.adapter.model_sites(self.model).head
        head = self.model.get_submodule(name)
        if self.weights is None or not any(p.is_meta for p in head.parameters()):
            yield
            return
        self.weights.materialize(head, f"{name}.")
        try:
            yield
        finally:
            head.to("meta")

    def outside_blocks(self) -> list[nn.Module]:
        """The modules outside the blocks that the model's forward runs (embedding, positions, final norm, head)."""
        sites = self.adapter.model_sites(self.model)
        names = [sites.embedding, sites.final_norm, sites.head, *sites.extra]
        return list(self.adapter.pre_block_modules(self.model)) + [self.model.get_submodule(n) for n in names if n]


def resolve_source(path: str, gguf_file: str | None = None, models_dir: str | None = None) -> ModelSource:
    """Find a model: an existing folder (as given, or under ``models_dir``) first, else a hub id."""
    if not path:
        raise ValueError("model.path is empty: set it to a local folder, a name under OMNIQ_MODELS_DIR or a hub id")
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([Path(models_dir) / p] if models_dir else [])
    for folder in candidates:
        if not folder.is_dir():
            continue
        needed = gguf_file or "config.json"
        if not (folder / needed).is_file():
            raise FileNotFoundError(
                f"model folder {folder} has no {needed}: put the model files there"
                + (" (model.gguf_file names the GGUF file)" if gguf_file else " (a Hugging Face model folder)")
            )
        return ModelSource(str(folder), gguf_file, local=True)
    if not p.is_absolute() and _HUB_ID.match(path):
        return ModelSource(path, gguf_file, local=False)
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"model files for '{path}' not found (looked in: {looked}). Set OMNIQ_MODELS_DIR (or paths.models_dir) "
        "to the folder that holds it, set model.path to its folder, or use a Hugging Face hub id like org/name"
    )


def model_type_of(source: ModelSource, trust_remote_code: bool = False) -> str:
    from transformers import AutoConfig

    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code, **kw)
    except OSError as exc:
        where = "local folder" if source.local else "Hugging Face hub (is the machine online and the id right?)"
        raise FileNotFoundError(f"could not read the model config of '{source.location}' from the {where}: {exc}") from exc
    return config.model_type


def forget_gguf_quantizer(model: nn.Module) -> None:
    """``transformers`` dequantizes GGUF tensors into ordinary ones but keeps a record of the GGUF
    quantizer, which makes ``save_pretrained`` refuse; the loaded weights are plain, so drop the record."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def load_model(
    path: str,
    *,
    adapter_for,
    gguf_file: str | None = None,
    models_dir: str | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    lazy: bool = False,
) -> LoadedModel:
    """Load model, tokenizer and the adapter of its family; unsupported families fail before any weights load.
    ``lazy``: the model built on the meta device with only the parts outside its blocks read now (:mod:`lazy`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source = resolve_source(path, gguf_file, models_dir)
    adapter = adapter_for(model_type_of(source, trust_remote_code))
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    required = adapter.required_attn_implementation
    if required is not None and attn_implementation != required:
        log.warning("model_type %s computes its attention correctly only with attn_implementation=%s: using it "
                    "instead of %s", model_type_of(source, trust_remote_code), required, attn_implementation)
        attn_implementation = required
    weights = None
    if lazy:
        model, weights = load_lazily(source, adapter, DTYPES[dtype], attn_implementation, trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            source.location,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **kw,
        )
    tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code, **kw)
    if source.gguf_file:
        forget_gguf_quantizer(model)
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model, tokenizer, adapter, source, weights)


def meta_model(path: str, *, adapter_for, gguf_file: str | None = None, models_dir: str | None = None,
               dtype: str = "float32", trust_remote_code: bool = False) -> tuple[nn.Module, ModelAdapter]:
    """The model of ``path``'s config with its parameters on the meta device, and its adapter: no weights read
    (what the memory plan measures)."""
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source = resolve_source(path, gguf_file, models_dir)
    adapter = adapter_for(model_type_of(source, trust_remote_code))
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    config = AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code, **kw)
    return build_lazily(config, DTYPES[dtype], None, trust_remote_code), adapter


def load_lazily(source: ModelSource, adapter: ModelAdapter, dtype, attn_implementation: str | None,
                trust_remote_code: bool) -> tuple[nn.Module, LazyWeights]:
    """The model on the meta device with the parts outside its blocks read from the checkpoint's shards."""
    from transformers import AutoConfig

    if source.gguf_file:
        raise ValueError("model.lazy=true reads safetensors checkpoints, not GGUF files: use model.lazy=false for "
                         f"{source.gguf_file}")
    folder = Path(source.location)
    if not source.local:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                          "*.txt"]))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = build_lazily(config, dtype, attn_implementation, trust_remote_code)
    weights = LazyWeights(model, folder)
    # the head is read only where it is used (evaluation, export): LoadedModel.head_loaded
    weights.materialize(model, "", exclude=(adapter.blocks_prefix(model) + ".", adapter.model_sites(model).head + "."))
    model.tie_weights()  # again: a tied head shares the embedding's new tensor
    return model, weights
