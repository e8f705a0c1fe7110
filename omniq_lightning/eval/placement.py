"""Where a model sits while it is evaluated: accelerate's device map, not a ``model.to(device)`` of our own.

On a CUDA device, accelerate's ``infer_auto_device_map`` spreads the decoder blocks over the GPUs present
(within ``max_memory``) and offloads what does not fit to CPU memory, then to disk; ``dispatch_model``
runs it with hooks that move each block's weights and inputs where they are needed. A model that fits on
one GPU simply moves there. On the CPU the model stays where it is unless ``max_memory`` is given, in
which case what exceeds it is offloaded to disk (how the path is tested without a GPU). Leaving the
context removes the hooks, which put every weight back where it was (the CPU), so quantization and
export continue on an ordinary model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


def device_map_for(model: nn.Module, device: torch.device, max_memory: Mapping[Any, Any] | None) -> dict[str, Any]:
    """The module -> device map accelerate infers for ``model`` (decoder blocks are never split)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device.type == "cuda" and max_memory is None:
        max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
    memory = None if max_memory is None else {_device_key(k): v for k, v in dict(max_memory).items()}
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)


def _device_key(key: Any) -> Any:
    """``max_memory`` keys as accelerate expects them: GPU indices as ints, "cpu" and "disk" as strings."""
    if isinstance(key, str) and key.isdigit():
        return int(key)
    if isinstance(key, str) and key.startswith("cuda:"):
        return int(key.split(":", 1)[1])
    return key


@dataclass(frozen=True)
class Placement:
    input_device: torch.device  # where the token ids go
    devices: tuple[str, ...]  # where the model's modules run or are offloaded to ("cuda:0", "cpu", "disk")


def _names(device_map: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted({f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values()}))


def _first_device(device_map: Mapping[str, Any]) -> torch.device:
    """Where inputs go: the device of the first module that is not offloaded (the embeddings), else the CPU."""
    for placed in device_map.values():
        if placed not in ("cpu", "disk"):
            return torch.device("cuda", placed) if isinstance(placed, int) else torch.device(placed)
    return torch.device("cpu")


@contextlib.contextmanager
def placed_for_evaluation(
    model: nn.Module,
    device: torch.device,
    max_memory: Mapping[Any, Any] | None = None,
    offload_dir: str | os.PathLike | None = None,
) -> Iterator[Placement]:
    """Place ``model`` for inference on ``device`` (see the module docstring)."""
    if device.type != "cuda" and max_memory is None:
        yield Placement(torch.device("cpu"), ("cpu",))
        return
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    device_map = device_map_for(model, device, max_memory)
    if "disk" in device_map.values() and offload_dir is None:
        raise ValueError("the model does not fit in eval.max_memory and must be offloaded to disk: set eval.offload_dir")
    if len(set(device_map.values())) == 1 and "disk" not in device_map.values():
        only = next(iter(device_map.values()))
        target = torch.device("cuda", only) if isinstance(only, int) else torch.device(only)
        model.to(target)  # it fits on one device: no hooks needed
        try:
            yield Placement(target, _names(device_map))
        finally:
            model.to("cpu")
        return
    with contextlib.ExitStack() as stack:
        folder = None
        if "disk" in device_map.values():  # a fresh folder: accelerate reuses an existing offload index as is
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            folder = stack.enter_context(tempfile.TemporaryDirectory(dir=offload_dir, prefix="eval-"))
        dispatch_model(model, device_map=device_map, offload_dir=folder)
        try:
            yield Placement(_first_device(device_map), _names(device_map))
        finally:
            remove_hook_from_module(model, recurse=True)  # restores offloaded weights to their original device
            model.to("cpu")
            if hasattr(model, "hf_device_map"):
                del model.hf_device_map
