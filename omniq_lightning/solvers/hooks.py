"""Running a quantized block over the calibration samples, with the inputs of its linears observed, or with its
weights or activations set aside to full precision."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

from omniq_lightning.calib import ActivationCache
from omniq_lightning.calib.loop import run_samples
from omniq_lightning.nn import ActQuantizer, ClusterActQuantizer, QuantLinear
from omniq_lightning.quant.spec import NO_QUANT_BITS
from omniq_lightning.transforms import QuantBlock


def weight_linears(qblock: QuantBlock) -> dict[str, QuantLinear]:
    """The block's linears whose weights are still to be quantized, by name."""
    return {n: m for n, m in qblock.block.named_modules() if isinstance(m, QuantLinear) and m.weight_quant}


@contextlib.contextmanager
def full_precision_weights(linears: Iterable[QuantLinear]) -> Iterator[None]:
    """While active, the given linears run with their unquantized weights (their quantizers set aside)."""
    saved = [(m, m.wq) for m in linears]
    for m, _ in saved:
        m.wq = None
    try:
        yield
    finally:
        for m, wq in saved:
            m.wq = wq


def activations_in_full_precision(qblock: QuantBlock):
    """While active, no activation or key/value quantizer of the block quantizes."""
    return quantizers_off([m for m in qblock.modules() if isinstance(m, (ActQuantizer, ClusterActQuantizer))])


@contextlib.contextmanager
def quantizers_off(quantizers: list) -> Iterator[None]:
    """While active, the given activation quantizers pass their inputs through (16 bits)."""
    saved = [m.bits for m in quantizers]
    for m in quantizers:
        m.bits = NO_QUANT_BITS
    try:
        yield
    finally:
        for m, b in zip(quantizers, saved, strict=True):
            m.bits = b


def run_block(qblock: QuantBlock, inputs: ActivationCache, ctx) -> None:
    """Run the block over every calibration sample (for what its hooks and observers record)."""
    run_samples(lambda x: qblock(x, ctx), inputs)


def weight_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a linear's weight multiplies: its input after its online input transform, if it has one."""
    transform = getattr(module, "input_transform", None)
    return x if transform is None else transform(x)


@torch.no_grad()
def run_with_input_hooks(qblock: QuantBlock, inputs: ActivationCache, ctx,
                         hooks: dict[str, Callable[[torch.Tensor], None]]) -> None:
    """Run the block over every calibration sample, handing each named module's input, as its weight multiplies
    it (after an online input transform), to ``hooks[name]``."""
    handles = [qblock.block.get_submodule(n).register_forward_pre_hook(lambda m, args, f=f: f(weight_input(m, args[0])))
               for n, f in hooks.items()]
    try:
        run_block(qblock, inputs, ctx)
    finally:
        for h in handles:
            h.remove()
