"""`ModelAdapter`: what the rest of the library may know about a model family, and block capture.

An adapter answers structural questions (where the blocks are, which modules run before and after
them) and calls a block standalone exactly as the full model would. Capture is family-independent:
a forward pre-hook on block 0 records the block's hidden-state input and every keyword argument the
model passes to it (attention mask, position ids, rotary position embeddings, ...), then stops the
forward pass, so the rest of the model is never run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Keyword arguments of a decoder layer that belong to generation, not to a standalone block call.
_GENERATION_KWARGS = {"past_key_values", "past_key_value", "use_cache", "cache_position", "output_attentions"}


@dataclass
class BlockContext:
    """Everything besides the hidden states that a block needs to run standalone.

    Captured from a batch of one sequence: tensors with a batch dimension of 1 broadcast over any
    batch of sequences of the same length.
    """

    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> BlockContext:
        return BlockContext({k: _move(v, device) for k, v in self.kwargs.items()})


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    return value


class _StopForward(Exception):
    """Raised by the capture hook once block 0's input is recorded."""


class ModelAdapter:
    """Base adapter. Subclasses name the model's parts; nothing outside ``models/`` knows them."""

    model_types: tuple[str, ...] = ()

    # --- structure -------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that run before block 0 (embeddings, positions): needed on the device to capture."""
        raise NotImplementedError

    def post_block_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that run after the last block (final norm, output head)."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def context_length(self, model: nn.Module) -> int:
        return int(model.config.max_position_embeddings)

    # --- running blocks ----------------------------------------------------------------------------
    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """Run one block standalone; returns its output hidden states."""
        out = block(hidden, **ctx.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def capture(
        self, model: nn.Module, batches: Iterable[torch.Tensor], store, device: torch.device | str
    ) -> BlockContext:
        """Run ``batches`` of token ids (shape ``[1, seqlen]``) up to block 0 and record its inputs.

        Each captured hidden state is written to ``store[i]`` (an activation cache). Returns the
        block context of the first batch (all batches share it: same length, no padding).
        """
        block0 = self.blocks(model)[0]
        captured: dict[str, Any] = {}

        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured["hidden"] = hidden
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in _GENERATION_KWARGS and k != "hidden_states"}
            raise _StopForward

        handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
        ctx: BlockContext | None = None
        try:
            for i, ids in enumerate(batches):
                if ids.dim() != 2 or ids.shape[0] != 1:
                    raise ValueError(f"capture expects token ids of shape [1, seqlen], got {tuple(ids.shape)}")
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("block 0 was never called: is the adapter pointing at the right blocks?")
                store[i] = captured["hidden"][0]
                if ctx is None:
                    ctx = BlockContext(captured["kwargs"])
        finally:
            handle.remove()
        if ctx is None:
            raise ValueError("capture needs at least one batch of calibration data")
        return ctx

    @torch.no_grad()
    def replay(self, model: nn.Module, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """Run all blocks standalone on captured block-0 inputs ``[n, seqlen, hidden]``; returns the last block's outputs."""
        out = []
        for x in hidden:
            h = x.unsqueeze(0)
            for block in self.blocks(model):
                h = self.call_block(block, h, ctx)
            out.append(h[0])
        return torch.stack(out)

    # --- helpers for subclasses ------------------------------------------------------------------------
    @classmethod
    def supports(cls, model_type: str) -> bool:
        return model_type in cls.model_types
