"""GPTQ (Frantar et al. 2023): Hessians from the block's calibration inputs, then column-wise quantization with
lazy batch updates (``solvers/gptq.py``)."""

from __future__ import annotations

from dataclasses import replace

from omniq_lightning.methods.base import DataNeeds, Method
from omniq_lightning.quant.gptq import check_damp
from omniq_lightning.solvers import gptq_block
from omniq_lightning.transforms import BlockSetup


class GPTQ(Method):
    name = "gptq"

    def __init__(self, damp: float = 0.01, act_order: bool = False, blocksize: int = 128, **label) -> None:
        super().__init__(**label)
        self.damp = check_damp(damp)
        if blocksize < 1:
            raise ValueError(f"method.blocksize must be positive, got {blocksize}")
        self.act_order, self.blocksize = act_order, blocksize

    def format_needs(self) -> frozenset[str]:
        return frozenset({"quantizer", "columns"})

    def data_needs(self) -> DataNeeds:
        return DataNeeds(moment_bytes=8)  # float64 input Hessians of the block's linears, all at once

    def setup(self, spec, traits) -> BlockSetup:
        return BlockSetup(replace(spec, lwc=False))

    def calibrate(self, qblock, data, run) -> dict[str, float]:
        return gptq_block(qblock, data.inputs, run.ctx, self.damp, self.act_order, self.blocksize)

    def describe(self) -> dict:
        return {"damp": self.damp, "act_order": self.act_order, "blocksize": self.blocksize}
