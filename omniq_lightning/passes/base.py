"""`ModelPass`: one whole-model pass of the stage before the block loop, and how the stage runs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class SavedPass:
    """What a pass saved in the run state the last time it ran in this output folder."""

    record: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    digest: str


@dataclass
class PassContext:
    """What a pass may use: the model (on the CPU), its adapter, the calibration windows ``[n, seqlen]``, the
    compute device, the run's output folder, the quantized linears' shapes by name in the model, and what the
    pass saved before in this folder (None on a first run)."""

    model: nn.Module
    adapter: Any
    windows: torch.Tensor
    device: torch.device
    out_dir: Path
    shapes: Mapping[str, tuple[int, int]]
    saved: SavedPass | None = None


@dataclass
class PassResult:
    """What a pass decided.

    record: JSON-serialisable, saved in ``state.json`` (with ``tensors`` it is what a rerun needs to reproduce a
      change of the model).
    tensors: saved in ``passes/<name>.safetensors``.
    formats: per-linear weight formats by name in the model (a bit plan), or None; saved beside the record, and
      part of each block's fingerprint through its own linears' formats.
    info: what results.json reports about the pass (timings, paths).
    """

    record: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    formats: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """SHA-256 over the record and the tensors (name, dtype, shape, bytes): equal digests, equal changes of the
        model (the formats are fingerprinted per block)."""
        h = hashlib.sha256(json.dumps(self.record, sort_keys=True, default=str).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


class ModelPass:
    """A whole-model pass. ``run`` computes (or, from ``ctx.saved``, re-applies) its decision and returns it."""

    name: str = ""

    def check_model(self, traits) -> None:
        """Refuse a model this pass cannot handle (``methods.ModelTraits``), before any work."""

    def run(self, ctx: PassContext) -> PassResult:
        raise NotImplementedError


def run_passes(passes: list[ModelPass], ctx: PassContext, state) -> dict[str, PassResult]:
    """Run the stage in order, each pass seeing what it saved before in ``state``; returns each pass's result
    (saving them is the caller's, once the blocks' fingerprints have been checked against them)."""
    results: dict[str, PassResult] = {}
    names = [p.name for p in passes]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"model passes need unique names, got {names}")
    for p in passes:
        ctx.saved = state.saved_pass(p.name) if state is not None else None
        results[p.name] = p.run(ctx)
    ctx.saved = None
    return results
