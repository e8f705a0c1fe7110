"""Lightning checkpoint IO with atomic writes and safe loading (``weights_only=True``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from omniq_lightning.calib.phases import phase
from omniq_lightning.io import atomic_write


class CorruptCheckpointError(RuntimeError):
    pass


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without the advice torch appends (never to be followed here)."""
    text = str(exc).strip()
    for marker in ("Weights only load failed", "WeightsUnpickler error:"):
        if marker in text:
            tail = text.split("WeightsUnpickler error:", 1)[-1].strip()
            return tail.splitlines()[0].split(". Check the documentation")[0].strip() if tail else marker
    return text.splitlines()[0] if text else type(exc).__name__


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file, fsyncs and renames, so a kill never leaves a half-written checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CorruptCheckpointError(
                f"checkpoint {path} holds objects that safe loading refuses ({first_line(exc)}); the checkpoints this "
                "project writes hold tensors and plain values only, so the file was not written by it or is damaged. "
                "Delete it to recalibrate this block from the start (do not load it unsafely)"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
            raise CorruptCheckpointError(
                f"checkpoint {path} cannot be read ({type(exc).__name__}: {first_line(exc)}). Delete it to "
                "recalibrate this block from the start"
            ) from None


class EpochCheckpoint(L.Callback):
    """Saves ``dirpath/last.ckpt`` at the end of every epoch (through the trainer's checkpoint IO)."""

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with phase("epoch checkpoints"):
            trainer.save_checkpoint(self.path, weights_only=False)  # full state: optimizer and loops too
