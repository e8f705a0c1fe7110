"""`ModelAdapter`: what the rest of the library may know about a model family, and block capture.

An adapter answers structural questions (where the blocks are, which modules run before and after
them) and calls a block standalone exactly as the full model would. Capture is family-independent:
a forward pre-hook on block 0 records the block's hidden-state input and every keyword argument the
model passes to it (attention mask, position ids, rotary position embeddings, ...), then stops the
forward pass, so the rest of the model is never run.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omniq_lightning.nn import QuantLinear, QuantMatMul, register_attention, swap_linears
from omniq_lightning.quant import QuantSpec
from omniq_lightning.transforms import LETNorm, LETPair, LETPairSpec, QuantBlock, smoothquant_scale

# Per-channel input ranges of a block's linears, by module name within the block: name -> (min, max).
InputStats = dict[str, tuple[torch.Tensor, torch.Tensor]]

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

    # --- quantization -------------------------------------------------------------------------------
    family: str = ""  # recipe family for methods' "auto" settings: "llama" or "opt"
    # Whether LET is used for weight-only settings when the method leaves it to the family (let: auto).
    let_for_weight_only: bool = False

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def let_pair_specs(self, block: nn.Module, stats: InputStats, alpha: float, shift: bool = True) -> list[LETPairSpec]:
        """The LET pairs of ``block`` with their initial factors (SmoothQuant scales, OS+ shifts where
        ``shift`` allows and the family can absorb them)."""
        raise NotImplementedError

    def base_attention(self, attn: nn.Module) -> Callable:
        """The attention function the module runs now (eager: its family's own implementation)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = attn.config._attn_implementation
        if impl in (None, "eager"):
            return sys.modules[type(attn).__module__].eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS[impl]

    def quantize_block(
        self,
        block: nn.Module,
        spec: QuantSpec,
        let: bool = False,
        stats: InputStats | None = None,
        alpha: float = 0.5,
        let_kinds: tuple[str, ...] = ("norm", "linear", "qk"),
        let_shift: bool = True,
    ) -> QuantBlock:
        """Swap in ``QuantLinear``s (and ``QuantMatMul``s), register LET pairs; returns a ``QuantBlock``.

        ``stats`` (per-channel input ranges of the fp block) initialises the LET factors; it is
        required when ``let`` is true. ``let_kinds`` selects pair kinds (norm, linear, qk).
        """
        specs: list[LETPairSpec] = []
        if let:
            if stats is None:
                raise ValueError("LET needs the block's input statistics to initialise its scales")
            specs = [s for s in self.let_pair_specs(block, stats, alpha, let_shift) if s.kind in let_kinds]
        swap_linears(block, lambda _name, lin: QuantLinear(lin, spec, quantize_input=spec.quantizes_activations))
        if spec.quantizes_activations or spec.quantizes_kv:
            name = register_attention()
            for attn in self.attention_modules(block):
                attn.omniq_matmul = QuantMatMul(spec.a_bits, spec.kv_bits, spec.a_symmetric, self.base_attention(attn))
                attn.config = copy.copy(attn.config)  # this module alone switches to the quantized attention
                attn.config._attn_implementation = name
        for s in specs:
            if s.kind == "norm" and not isinstance(block.get_submodule(s.source), LETNorm):
                block.set_submodule(s.source, LETNorm(block.get_submodule(s.source)))
        return QuantBlock(block, {s.name: LETPair(s) for s in specs}, self.call_block)

    # --- helpers for subclasses ------------------------------------------------------------------------
    @classmethod
    def supports(cls, model_type: str) -> bool:
        return model_type in cls.model_types

    @staticmethod
    def input_absmax(stats: InputStats, name: str, shift: torch.Tensor | None = None) -> torch.Tensor:
        lo, hi = stats[name]
        if shift is not None:
            lo, hi = lo - shift, hi - shift
        return torch.maximum(lo.abs(), hi.abs())

    @staticmethod
    def weight_absmax(block: nn.Module, names: list[str]) -> torch.Tensor:
        """Per input column: the largest |w| over the rows of all named linears."""
        return torch.cat([block.get_submodule(n).weight.detach().float() for n in names]).abs().amax(0)

    @staticmethod
    def norm_pair(block, name, norm, targets, stats, alpha, use_shift) -> LETPairSpec:
        lo, hi = stats[targets[0]]
        shift = ((lo + hi) / 2).float() if use_shift else None
        act = ModelAdapter.input_absmax(stats, targets[0], shift)
        scale = smoothquant_scale(act, ModelAdapter.weight_absmax(block, targets), alpha)
        return LETPairSpec(name, "norm", norm, targets, scale, shift)
