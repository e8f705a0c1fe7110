"""The method interface: how a block is prepared, calibrated and finalized."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from omniq_lightning.calib import ActivationCache, BlockDataModule, BlockRun
from omniq_lightning.nn import QuantLinear
from omniq_lightning.quant import QuantSpec
from omniq_lightning.transforms import BlockPlan, QuantBlock


class Method:
    """One algorithm. ``plan`` decides the quantized block's shape; ``calibrate`` fits its parameters;
    ``finalize`` folds them into plain weights and returns the block to put back into the model."""

    name: str = ""
    vector_formats: bool = False  # whether it quantizes weights onto codebooks (quant.w_vq) rather than grids

    def validate(self, spec: QuantSpec) -> None:
        """Refuse quantization settings this method cannot handle (called before any model loads)."""

    def plan(self, spec: QuantSpec, family: str, let_for_weight_only: bool) -> BlockPlan:
        """How blocks are built: the spec, which declared transforms (roles) they get. ``family`` and
        ``let_for_weight_only`` are the adapter's answers (recipe family, LET default)."""
        raise NotImplementedError

    def calibrate(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> dict[str, float] | None:
        """Fit the block's parameters; the block is left on ``run.device``. May return statistics for the
        block's record in results.json."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The method's settings as resolved for this run (recorded in results.json)."""
        return {}

    def finalize(self, qblock: QuantBlock) -> nn.Module:
        return qblock.fold()


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


def weight_linears(qblock: QuantBlock) -> dict[str, QuantLinear]:
    """The block's linears whose weights are still to be quantized, by name."""
    return {n: m for n, m in qblock.block.named_modules() if isinstance(m, QuantLinear) and m.weight_quant}


@torch.no_grad()
def run_with_input_hooks(qblock: QuantBlock, inputs: ActivationCache, ctx,
                         hooks: dict[str, Callable[[torch.Tensor], None]]) -> None:
    """Run the block over every calibration sample, handing each named linear's input to ``hooks[name]``."""
    handles = [qblock.block.get_submodule(n).register_forward_pre_hook(lambda _m, args, f=f: f(args[0]))
               for n, f in hooks.items()]
    try:
        for j in range(len(inputs)):
            qblock(inputs[j].unsqueeze(0).float(), ctx)
    finally:
        for h in handles:
            h.remove()
