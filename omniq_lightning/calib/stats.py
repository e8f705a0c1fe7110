"""Per-channel input ranges of a block's linear layers (and MoE routers), gathered while the block runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from omniq_lightning import distributed
from omniq_lightning.nn import LETRouter


@contextmanager
def observe_linear_inputs(block: nn.Module) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """While active, every forward of a linear inside ``block`` updates ``stats[name] = (min, max)``
    over all tokens seen, per input channel as its weight sees them (after an online input transform; float32).
    On leaving, the ranges are combined over the ranks of a data-parallel run (every rank's samples seen)."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args):
            x = args[0] if getattr(module, "input_transform", None) is None else module.input_transform(args[0])
            x = x.detach().reshape(-1, x.shape[-1]).float()
            lo, hi = x.amin(0), x.amax(0)
            if name in stats:
                lo, hi = torch.minimum(stats[name][0], lo), torch.maximum(stats[name][1], hi)
            stats[name] = (lo, hi)

        return hook

    for name, module in block.named_modules():
        if isinstance(module, (nn.Linear, LETRouter)):
            handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
    distributed.merge_ranges(stats)
