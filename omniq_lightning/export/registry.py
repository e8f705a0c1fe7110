"""Exporters: one per ``export.format``, each in a file of its own, registered here.

An exporter says what it cannot hold (``why_not``: a reason, or None) and writes its checkpoint (``write``). The
pipeline asks the exporter the run names before any calibration (with every linear's format and shape), and
after calibration has it rewrite the fake-quant export from the stored codes. ``kinds`` names the weight format
kinds it holds (``nn.formats``); a run with any other kind is refused without asking the exporter.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omniq_lightning.export.online import ONLINE_KINDS, OnlineInput
from omniq_lightning.quant import QuantSpec


class UnsupportedFormat(ValueError):
    pass


@dataclass(frozen=True)
class ExportRequest:
    """What a run would export: the spec, every quantized linear's weight format (a mixed plan may differ per
    linear), the linears' shapes, whether the model's checkpoint holds its experts as fused 3-D tensors (what
    per-linear packed formats cannot express), the kinds of transform that run online beside the weights
    (``export.online.ONLINE_KINDS``: folded transforms are in the weights already), and, for a request made from a
    loaded model, its ``model_type`` and GGUF layout (``ModelAdapter.gguf_layout``; None: the family has none)."""

    spec: QuantSpec
    formats: frozenset
    fused_experts: bool = False
    shapes: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    online_transforms: tuple[str, ...] = ()
    model_type: str | None = None
    gguf_layout: Any = None
    renamed_checkpoint: bool = False  # the saved checkpoint names modules otherwise (ModelAdapter.checkpoint_prefixes)


@dataclass(frozen=True)
class ExportJob:
    """An export to write: the fake-quant checkpoint (``fake_dir``: the model's own layout, config, tokenizer),
    every quantized linear's stored codes by its name in the model, the spec, where to write, the dtype of the
    tensors that are not quantized, and the linears whose inputs are transformed online (with their matrices)."""

    fake_dir: Path
    codes: Mapping[str, Any]
    spec: QuantSpec
    path: Path
    dtype: torch.dtype = torch.float16
    online_inputs: tuple[OnlineInput, ...] = ()


class Exporter:
    name: str = ""
    kinds: tuple[str, ...] = ()  # weight format kinds it holds; () with needs_codes False: anything
    needs_codes: bool = True  # refuses a run whose weights are not quantized
    online_kinds: frozenset[str] = frozenset()  # the kinds of online transform it holds (export.online)

    def why_not(self, req: ExportRequest) -> str | None:
        """Why this format cannot hold the request (None if it can), beyond the kinds it holds."""
        return None

    def write(self, job: ExportJob) -> Path:
        raise NotImplementedError


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> Exporter:
    """Make ``export.format=<exporter.name>`` available."""
    if not exporter.name:
        raise ValueError("an exporter needs a name")
    if exporter.name in EXPORTERS and type(EXPORTERS[exporter.name]) is not type(exporter):
        raise ValueError(f"export.format {exporter.name!r} is already registered by {type(EXPORTERS[exporter.name]).__name__}")
    EXPORTERS[exporter.name] = exporter
    return exporter


def exporter(name: str) -> Exporter:
    if name not in EXPORTERS:
        raise ValueError(f"export.format must be one of {tuple(EXPORTERS)}, got {name!r}")
    return EXPORTERS[name]


def why_not(name: str, req: ExportRequest) -> str | None:
    """Why ``export.format=name`` cannot hold this quantization (None if it can)."""
    e = exporter(name)
    formats = {f for f in req.formats if f.quantized}
    if not e.needs_codes:
        return e.why_not(req)
    if not formats:
        return "the weights are not quantized"
    unheld = [k for k in req.online_transforms if k not in e.online_kinds]
    if unheld:
        return (f"it has no place for transforms that run online ({', '.join(ONLINE_KINDS[k] for k in unheld)}): "
                "folded rotations export as plain weights, so use rotation.qk=false rotation.down=false and no "
                "method.affine, or export.format=fake (load_fake_quant re-attaches them)")
    other = sorted({f.kind for f in formats} - set(e.kinds))
    if other:
        fitting = [n for n, x in EXPORTERS.items() if x.needs_codes and {f.kind for f in formats} <= set(x.kinds)]
        return (f"it holds {' and '.join(e.kinds)} weight formats, not {' and '.join(other)}"
                + (f" (those export as export.format={' or '.join(fitting)})" if fitting else ""))
    return e.why_not(req)


def fitting_formats(req: ExportRequest) -> list[str]:
    return [n for n in EXPORTERS if not why_not(n, req)]


def check_export(name: str, req: ExportRequest) -> None:
    """Refuse a format that cannot hold this quantization, naming the formats that can."""
    reason = why_not(name, req)
    if reason:
        raise UnsupportedFormat(f"export.format={name} cannot hold this quantization: {reason}. Formats that fit: "
                                f"{', '.join(fitting_formats(req))}")


def write_export(name: str, fake_dir: str | os.PathLike, codes: Mapping[str, Any], spec: QuantSpec,
                 path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                 online: tuple[str, ...] = (), online_inputs: tuple[OnlineInput, ...] = ()) -> Path:
    """Write the ``name`` checkpoint of a finished run (refused, as before calibration, if it cannot hold it):
    ``online`` names the kinds of online transform the model runs, ``online_inputs`` the linears they transform."""
    req = ExportRequest(spec, frozenset(q.fmt for q in codes.values()), shapes=frozenset(q.shape for q in codes.values()),
                        online_transforms=tuple(online))
    check_export(name, req)
    return exporter(name).write(ExportJob(Path(fake_dir), codes, spec, Path(path), dtype, tuple(online_inputs)))
