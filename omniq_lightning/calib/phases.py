"""Where a block's calibration time goes: named phases, timed while the block loop records.

The block loop opens :func:`recording` around each block; code anywhere below it marks its work with
``with phase("gptq rounding"):``. Times are exclusive: a phase opened inside another pauses the outer one, so the
phases of a block add up to the time spent inside them. Outside a recording, :func:`phase` only labels the work
for ``torch.profiler`` (``record_function``), at no cost worth measuring. On a CUDA device the recorder
synchronizes at each boundary, so asynchronous kernels are charged to the phase that launched them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

import torch


class PhaseRecorder:
    """Exclusive seconds per phase name."""

    def __init__(self, sync_cuda: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.sync_cuda = sync_cuda
        self._stack: list[list] = []  # [name, start of its current uninterrupted stretch]

    def _now(self) -> float:
        if self.sync_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _charge(self, name: str, start: float, now: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + (now - start)

    def enter(self, name: str) -> None:
        now = self._now()
        if self._stack:  # pause the enclosing phase
            outer = self._stack[-1]
            self._charge(outer[0], outer[1], now)
        self._stack.append([name, now])

    def exit(self) -> None:
        now = self._now()
        name, start = self._stack.pop()
        self._charge(name, start, now)
        if self._stack:  # resume the enclosing phase
            self._stack[-1][1] = now

    def rounded(self, digits: int = 3) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.seconds.items()}


_CURRENT: ContextVar[PhaseRecorder | None] = ContextVar("omniq_phase_recorder", default=None)


@contextlib.contextmanager
def recording(sync_cuda: bool = False) -> Iterator[PhaseRecorder]:
    """Record the phases opened inside (replacing any outer recording while active)."""
    recorder = PhaseRecorder(sync_cuda)
    token = _CURRENT.set(recorder)
    try:
        yield recorder
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the work inside to ``name`` in the current recording (if any), and label it for the profiler."""
    recorder = _CURRENT.get()
    with torch.profiler.record_function(name):
        if recorder is None:
            yield
            return
        recorder.enter(name)
        try:
            yield
        finally:
            recorder.exit()


def add_phases(total: dict[str, float], seconds: dict[str, float]) -> dict[str, float]:
    """``total`` plus ``seconds``, phase by phase (a new dict)."""
    out = dict(total)
    for k, v in seconds.items():
        out[k] = out.get(k, 0.0) + v
    return out
