"""Lazy loading: the model built on the meta device, each part's weights read from the checkpoint's safetensors
shards when its turn comes, and given back (to the meta device) when it is done.

A lazily held model has real tensors only where :func:`materialize` put them: the parts outside the blocks
(embedding, final norm, head) from the start, and the block the loop is working on. Buffers computed at
construction (rotary frequencies) are real from the start: the model is built with only its parameters on the
meta device. Checkpoint tensors are read under the model's own names; a checkpoint that ``transformers``
converts on load (e.g. per-expert MoE weights into fused ones) is refused, naming the first missing tensor.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardIndex:
    """Which safetensors file of a checkpoint folder holds each tensor (``model.safetensors`` or the shards an
    index names); every shard is checked to exist before anything is read."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
            if missing:
                raise FileNotFoundError(
                    f"{index} names shards that are not in {self.folder}: {', '.join(missing[:5])}"
                    f"{' ...' if len(missing) > 5 else ''}. Download the missing files (the checkpoint is incomplete)")
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif (self.folder / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.folder / SINGLE), framework="pt") as f:
                self.files = {name: self.folder / SINGLE for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        else:
            raise FileNotFoundError(
                f"model.lazy=true reads safetensors checkpoints, and {self.folder} has neither {SINGLE} nor {INDEX}: "
                "convert the checkpoint to safetensors or use model.lazy=false")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (checkpoint names), each shard opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out


def checkpoint_name(name: str, index: ShardIndex, prefixes: tuple[str, ...]) -> str | None:
    """The checkpoint's name of the model tensor ``name``: as it is, or with the model's base prefix added or
    dropped (checkpoints saved from the base model or from the head model)."""
    if name in index:
        return name
    for p in prefixes:
        if name.startswith(p) and name[len(p):] in index:
            return name[len(p):]
        if p + name in index:
            return p + name
    return None


def meta_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``module``'s parameters and persistent buffers still on the meta device, by full name."""
    out = {f"{prefix}{n}": p for n, p in module.named_parameters() if p.is_meta}
    persistent = set(module.state_dict(keep_vars=True))
    out.update({f"{prefix}{n}": b for n, b in module.named_buffers() if b.is_meta and n in persistent})
    return out


class LazyWeights:
    """Reads a lazily built model's tensors from its checkpoint (:class:`ShardIndex`) into the model."""

    def __init__(self, model: nn.Module, folder: str | Path) -> None:
        self.model = model
        self.index = ShardIndex(folder)
        base = getattr(model, "base_model_prefix", "") or ""
        self.prefixes = (f"{base}.",) if base else ()

    def materialize(self, module: nn.Module, prefix: str, exclude: tuple[str, ...] = ()) -> nn.Module:
        """Give every meta tensor of ``module`` (named ``prefix`` + its name in ``module``; ``exclude``: name
        prefixes to leave on the meta device) its checkpoint value, in the tensor's dtype, on the CPU."""
        wanted = {n: t for n, t in meta_tensors(module, prefix).items() if not n.startswith(exclude)}
        names = {}
        for n in wanted:
            found = checkpoint_name(n, self.index, self.prefixes)
            if found is None:
                raise KeyError(
                    f"the checkpoint in {self.index.folder} has no tensor '{n}': lazy loading reads tensors under the "
                    "model's own names, and this checkpoint stores them otherwise (transformers converts some, e.g. "
                    "per-expert MoE weights, while it loads). Use model.lazy=false")
            names[n] = found
        values = self.index.read(names.values())
        for n, t in wanted.items():
            value = values[names[n]]
            if tuple(value.shape) != tuple(t.shape):
                raise ValueError(f"checkpoint tensor '{names[n]}' has shape {tuple(value.shape)}, the model's "
                                 f"'{n}' {tuple(t.shape)}: the checkpoint and its config.json disagree")
            set_tensor(module, n[len(prefix):], value.to(t.dtype), isinstance(t, nn.Parameter))
        return module


def set_tensor(module: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if parameter:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = value


def release(module: nn.Module) -> nn.Module:
    """``module``'s tensors given back: moved to the meta device (its structure stays)."""
    return module.to("meta")


def build_lazily(config, dtype: torch.dtype | str, attn_implementation: str | None, trust_remote_code: bool):
    """The model of ``config`` with its parameters on the meta device (no memory) and its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # a tied head shares the embedding's tensor (from_pretrained ties after loading)
    return model
