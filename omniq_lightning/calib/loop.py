"""The one loop over calibration samples: every method, statistic and range observer runs its block through it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from omniq_lightning.calib.cache import ActivationCache


@torch.no_grad()
def run_samples(fn: Callable[[torch.Tensor], torch.Tensor], inputs: ActivationCache,
                out: ActivationCache | None = None, target: ActivationCache | None = None) -> float | None:
    """Call ``fn`` on every calibration sample in order (``[1, tokens, hidden]``, float32); with ``out``, store
    each result there (``out`` may be ``inputs``); with ``target``, return the mean over samples of the mean
    squared error of the results against it."""
    err, count = 0.0, 0
    for j in range(len(inputs)):
        y = fn(inputs[j].unsqueeze(0).float())[0]
        if target is not None:
            err += torch.mean((y.float() - target[j].float()) ** 2).item()
            count += 1
        if out is not None:
            out[j] = y
    return err / count if count else None
