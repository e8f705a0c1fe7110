"""`BlockDataModule`: batches of cached block inputs and their targets, straight from the cache."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from omniq_lightning.calib.cache import ActivationCache


class BlockDataModule(L.LightningDataModule):
    """Yields ``(inputs, targets[, extra_targets])`` batches in a fixed order.

    Batches are gathered from the caches by index on each step: the cache is never copied per epoch.
    The order is the sample order, so an epoch is the same computation every time (deterministic
    resume from an epoch checkpoint).
    """

    def __init__(self, inputs: ActivationCache, targets: ActivationCache, batch_size: int = 1,
                 extra_targets: ActivationCache | None = None) -> None:
        super().__init__()
        if len(inputs) != len(targets):
            raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        if batch_size < 1:
            raise ValueError(f"method.batch_size must be positive, got {batch_size}")
        self.inputs, self.targets, self.extra = inputs, targets, extra_targets
        self.batch_size = batch_size

    def _gather(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        caches = [self.inputs, self.targets] + ([self.extra] if self.extra is not None else [])
        return tuple(c.batch(idx) for c in caches)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(len(self.inputs)), batch_size=self.batch_size, shuffle=False, collate_fn=self._gather)
