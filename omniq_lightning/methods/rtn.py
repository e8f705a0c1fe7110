"""Round-to-nearest: min/max ranges, no clipping, no transforms. The floor every method must beat."""

from __future__ import annotations

from dataclasses import replace

from omniq_lightning.methods.base import Method
from omniq_lightning.transforms import BlockSetup


class RTN(Method):
    name = "rtn"

    def setup(self, spec, traits) -> BlockSetup:
        return BlockSetup(replace(spec, lwc=False))

    def calibrate(self, qblock, data, run) -> None:
        return None
