"""SmoothQuant: migrate activation outliers into the weights with ``s = max|X|^alpha / max|W|^(1-alpha)``
on the norm -> linear sites, then round to nearest. For weight-activation settings only."""

from __future__ import annotations

from dataclasses import replace

from omniq_lightning.methods.base import Method
from omniq_lightning.transforms import BlockSetup


class SmoothQuant(Method):
    name = "smoothquant"

    def __init__(self, alpha: float = 0.5, **label) -> None:
        super().__init__(**label)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"method.alpha (migration strength) must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def validate(self, spec) -> None:
        if not spec.quantizes_activations:
            raise ValueError(
                f"SmoothQuant migrates activation outliers, so it needs a weight-activation setting "
                f"(quant=w8a8, w6a6 or w4a4), not {spec.name}; for weight-only settings use rtn, gptq, awq or omniquant"
            )

    def setup(self, spec, traits) -> BlockSetup:
        return BlockSetup(replace(spec, lwc=False), scale_locations=("norm",), scale_alpha=self.alpha, scale_shift=False)

    def calibrate(self, qblock, data, run) -> None:
        return None  # the scales are SmoothQuant's statistics, set when the block was built

    def describe(self) -> dict:
        return {"alpha": self.alpha}
