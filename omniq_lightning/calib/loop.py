"""The one loop over calibration samples: every method, statistic and range observer runs its block through it."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import torch

from omniq_lightning import distributed
from omniq_lightning.calib.cache import ActivationCache

_SAMPLE: ContextVar[int | None] = ContextVar("omniq_current_sample", default=None)


def current_sample() -> int:
    """The calibration sample :func:`run_samples` is running (its index among all samples, whichever rank holds
    it), for hooks that pick tokens per sample."""
    j = _SAMPLE.get()
    if j is None:
        raise RuntimeError("current_sample() is only known inside run_samples")
    return j


@torch.no_grad()
def run_samples(fn: Callable[[torch.Tensor], torch.Tensor], inputs: ActivationCache,
                out: ActivationCache | None = None, target: ActivationCache | None = None) -> float | None:
    """Call ``fn`` on every calibration sample in order (``[1, tokens, hidden]``, float32); with ``out``, store
    each result there (``out`` may be ``inputs``); with ``target``, return the mean over samples (over every rank's
    samples, in a data-parallel run) of the mean squared error of the results against it."""
    err, count = 0.0, 0
    for j in range(len(inputs)):
        token = _SAMPLE.set(inputs.ids[j])
        try:
            y = fn(inputs[j].unsqueeze(0).float())[0]
        finally:
            _SAMPLE.reset(token)
        if target is not None:
            err += torch.mean((y.float() - target[j].float()) ** 2).item()
            count += 1
        if out is not None:
            out[j] = y
    if target is None:
        return None
    err, count = distributed.sum_floats(err, count)
    return err / count if count else None
