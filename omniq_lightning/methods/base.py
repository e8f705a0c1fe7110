"""The method interface: how a block is prepared, calibrated and finalized."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from omniq_lightning.calib import BlockDataModule, BlockRun
from omniq_lightning.quant import QuantSpec
from omniq_lightning.transforms import QuantBlock


@dataclass(frozen=True)
class BlockPlan:
    """How to build a block's ``QuantBlock``: the spec its layers use and whether it gets LET pairs."""

    spec: QuantSpec
    let: bool
    let_alpha: float = 0.5
    let_kinds: tuple[str, ...] = ("norm", "linear", "qk")  # which of the adapter's LET pairs to build
    let_shift: bool = True  # shifts where the preceding op can absorb them (OPT), never where it cannot


class Method:
    """One algorithm. ``plan`` decides the quantized block's shape; ``calibrate`` fits its parameters;
    ``finalize`` folds them into plain weights and returns the block to put back into the model."""

    name: str = ""

    def validate(self, spec: QuantSpec) -> None:
        """Refuse quantization settings this method cannot handle (called before any model loads)."""

    def plan(self, spec: QuantSpec, family: str, let_for_weight_only: bool) -> BlockPlan:
        """``family`` and ``let_for_weight_only`` are the adapter's answers (recipe family, LET default)."""
        raise NotImplementedError

    def calibrate(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> None:
        raise NotImplementedError

    def finalize(self, qblock: QuantBlock) -> nn.Module:
        return qblock.fold()
