"""Block-wise calibration: activation cache, Lightning module and data module, run state and resume."""

from omniq_lightning.calib.cache import ActivationCache
from omniq_lightning.calib.checkpoint import AtomicCheckpointIO, CorruptCheckpointError, EpochCheckpoint
from omniq_lightning.calib.datamodule import BlockDataModule
from omniq_lightning.calib.lightning import BlockLightningModule, KeepBest, TrainSettings, channel_energy
from omniq_lightning.calib.run import BlockRun
from omniq_lightning.calib.state import RunState
from omniq_lightning.calib.stats import observe_linear_inputs

__all__ = [
    "ActivationCache",
    "AtomicCheckpointIO",
    "BlockDataModule",
    "BlockLightningModule",
    "BlockRun",
    "CorruptCheckpointError",
    "EpochCheckpoint",
    "KeepBest",
    "RunState",
    "TrainSettings",
    "channel_energy",
    "observe_linear_inputs",
]
