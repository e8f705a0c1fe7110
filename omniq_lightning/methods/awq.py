"""AWQ (Lin et al. 2024) on the block rails: activation-aware scale search over the adapter's sites, then the
clipping search (``solvers/awq.py``), stored as LWC logits so that folding is OmniQuant's."""

from __future__ import annotations

from omniq_lightning.methods.base import DataNeeds, Method
from omniq_lightning.solvers import AWQ_LOCATIONS, awq_block
from omniq_lightning.transforms import BlockSetup


class AWQ(Method):
    name = "awq"

    def __init__(self, n_grid: int = 20, clip: bool = True, max_shrink: float = 0.5, **label) -> None:
        super().__init__(**label)
        if n_grid < 1:
            raise ValueError(f"method.n_grid must be positive, got {n_grid}")
        if not 0.0 <= max_shrink < 1.0:
            raise ValueError(f"method.max_shrink must be in [0, 1), got {max_shrink}")
        self.n_grid, self.clip, self.max_shrink = n_grid, clip, max_shrink

    def validate(self, spec) -> None:
        if not spec.quantizes_weights:
            raise ValueError(f"AWQ quantizes weights, but {spec.name} keeps them in 16 bits: choose w_bits in 2..8")

    def format_needs(self) -> frozenset[str]:
        return frozenset({"quantizer", "grid"})

    def data_needs(self) -> DataNeeds:
        return DataNeeds(moment_bytes=4)  # float32 Gram matrices of the block's linear inputs

    def setup(self, spec, traits) -> BlockSetup:
        return BlockSetup(spec, scale_locations=AWQ_LOCATIONS, scale_shift=False)

    def calibrate(self, qblock, data, run) -> None:
        if not self.clip:
            for wq in qblock.weight_quantizers():
                wq.disable_lwc()  # no clipping: plain min/max ranges
        awq_block(qblock, data.inputs, run.ctx, self.n_grid, self.clip, self.max_shrink)

    def describe(self) -> dict:
        return {"n_grid": self.n_grid, "clip": self.clip, "max_shrink": self.max_shrink}
