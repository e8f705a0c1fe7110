"""A mixed-precision plan: one weight format per quantized linear, under an average-bit budget.

``bit_plan.json`` (written to ``output_dir``, read back with ``quant.mixed.plan=PATH`` so a user can edit one)::

    {"avg_bits": 3.02, "budget": 3.03, "sensitivity": "proxy",
     "candidates": [{"bits": 2, "group_size": 64, ...}, ...],
     "linears": {"model.layers.0.self_attn.q_proj": {"bits": 4, "group_size": 64, "symmetric": false,
                                                     "grid": "uniform", "grid_exponent": 1.5}, ...}}

Bits are counted as ``WeightFormat.storage_bits`` counts them: the codes, a 16-bit scale per group and,
for asymmetric grids, the zero point.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omniq_lightning.io import write_json
from omniq_lightning.quant import WeightFormat
from omniq_lightning.quant.gguf import GGUF_TYPES, GGUFFormat
from omniq_lightning.quant.spec import NO_QUANT_BITS, format_from_dict

ESTIMATORS = ("measured", "proxy", "kfac", "kfac-gptq", "local", "local-gptq")
SEARCH_PENALTIES = (64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0)
_CANDIDATE = re.compile(r"^w?(\d+)(?:g(\d+))?(sym)?$")


def parse_candidate(c: str | Mapping[str, Any], symmetric: bool = False):
    """A candidate format: a mapping of a format's fields (with its ``kind``: a scalar ``WeightFormat`` without), a
    name like ``w3g64``, ``w4``, ``w8sym``, ``w16`` (left 16-bit), or one of llama.cpp's GGUF types (``Q4_K``,
    ``Q2_K``, ``Q8_0``; ``F16``: 16-bit)."""
    if isinstance(c, Mapping):
        return format_from_dict(c)
    name = str(c).strip()
    if name.upper() in GGUF_TYPES:
        return GGUFFormat(name.upper())
    if name.upper() == "F16":  # a 16-bit linear, as llama.cpp keeps rows no type's block divides
        return WeightFormat(NO_QUANT_BITS)
    m = _CANDIDATE.match(name)
    if not m:
        raise ValueError(f"quant.mixed.candidates entry {c!r} is not a weight format: use names like w2g64, w3g64, w4, "
                         f"w8 (bits, optional group size, optional sym) or GGUF types ({', '.join(GGUF_TYPES)})")
    bits, group, sym = m.groups()
    return WeightFormat(int(bits), int(group) if group else None, bool(sym) or symmetric)


@dataclass(frozen=True)
class MixedSettings:
    """The ``quant.mixed`` settings: the budget, the candidate formats and how sensitivities are estimated."""

    avg_bits: float
    candidates: tuple[WeightFormat, ...]
    sensitivity: str = "proxy"
    plan: str | None = None  # a bit_plan.json to run instead of allocating one
    windows: int = 8  # calibration windows the estimators use
    search_penalties: tuple[float, ...] = SEARCH_PENALTIES  # the local estimators' plan search (mixed.search)

    def __post_init__(self) -> None:
        if self.plan is not None and not Path(self.plan).is_file():
            what = "is a folder" if Path(self.plan).is_dir() else "does not exist"
            raise FileNotFoundError(f"quant.mixed.plan={self.plan} {what}: give the path of a bit_plan.json file (a run "
                                    "writes one to its output_dir), or leave quant.mixed.plan=null to allocate a plan")
        if self.sensitivity not in ESTIMATORS:
            raise ValueError(f"quant.mixed.sensitivity must be one of {ESTIMATORS}, got {self.sensitivity!r}")
        if not self.candidates:
            raise ValueError("quant.mixed.candidates must name at least one weight format (e.g. [w2g64, w3g64, w4g64, w8])")
        if not (1.0 <= float(self.avg_bits) <= 16.0):
            raise ValueError(f"quant.mixed.avg_bits must be a number of bits per weight in [1, 16], got {self.avg_bits}")
        if self.windows < 1:
            raise ValueError(f"quant.mixed.sensitivity_windows must be positive, got {self.windows}")
        if not self.search_penalties or any(p < 0 for p in self.search_penalties):
            raise ValueError("quant.mixed.search_penalties must be a non-empty list of move penalties >= 0 (units of "
                             f"the median score), got {list(self.search_penalties)}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], symmetric: bool) -> MixedSettings:
        """The ``quant.mixed`` node (``symmetric``: the quant's ``w_symmetric``, for candidates named without it)."""
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - set(MIXED_KEYS))
        if unknown:
            raise ValueError(f"unknown quant.mixed setting(s) {unknown}; allowed keys are {list(MIXED_KEYS)}")
        if cfg.get("avg_bits") is None:
            raise ValueError("quant.mixed needs avg_bits (the average bits per weight to fit), e.g. quant.mixed.avg_bits=3")
        try:
            avg_bits, windows = float(cfg["avg_bits"]), int(cfg.get("sensitivity_windows", 8))
            penalties = tuple(float(p) for p in cfg.get("search_penalties") or SEARCH_PENALTIES)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"quant.mixed.avg_bits, sensitivity_windows and search_penalties must be numbers ({exc})") from None
        return cls(avg_bits=avg_bits, candidates=tuple(parse_candidate(c, symmetric) for c in cfg.get("candidates") or []),
                   sensitivity=str(cfg.get("sensitivity", "proxy")), plan=cfg.get("plan"), windows=windows,
                   search_penalties=penalties)


MIXED_KEYS = ("avg_bits", "candidates", "sensitivity", "plan", "sensitivity_windows", "search_penalties")


@dataclass(frozen=True)
class BitPlan:
    """The format of every quantized linear, by its name in the model."""

    formats: dict[str, WeightFormat]
    budget: float | None = None
    sensitivity: str | None = None
    candidates: tuple[WeightFormat, ...] = ()

    def avg_bits(self, shapes: Mapping[str, tuple[int, int]]) -> float:
        """The exact average storage bits per weight over the linears in ``shapes`` (``name -> (out, in)``)."""
        total = sum(self.formats[n].storage_bits(*s) for n, s in shapes.items())
        return total / sum(o * i for o, i in shapes.values())

    def for_block(self, prefix: str) -> dict[str, WeightFormat]:
        """The formats of the linears of one block (``prefix`` = ``model.layers.3``), by name within the block."""
        p = prefix + "."
        return {n[len(p):]: f for n, f in self.formats.items() if n.startswith(p)}

    def to_dict(self, shapes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if shapes is not None:
            out["avg_bits"] = round(self.avg_bits(shapes), 6)
        out |= {"budget": self.budget, "sensitivity": self.sensitivity,
                "candidates": [c.to_dict() for c in self.candidates],
                "linears": {n: f.to_dict() for n, f in sorted(self.formats.items())}}
        return out

    def save(self, path: str | os.PathLike, shapes: Mapping[str, tuple[int, int]]) -> Path:
        return write_json(path, self.to_dict(shapes))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BitPlan:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"bit plan {p} not found (quant.mixed.plan): give the path of a bit_plan.json")
        try:
            data = json.loads(p.read_text())
            formats = {n: format_from_dict(f) for n, f in data["linears"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"bit plan {p} cannot be read ({type(exc).__name__}: {exc}): it needs a 'linears' "
                             "mapping of module name -> {bits, group_size, symmetric, grid, grid_exponent}") from exc
        return cls(formats, data.get("budget"), data.get("sensitivity"),
                   tuple(format_from_dict(c) for c in data.get("candidates", [])))

    def check_covers(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        """Every quantized linear has a format that fits it, and the plan names no other module."""
        missing = sorted(set(shapes) - set(self.formats))
        extra = sorted(set(self.formats) - set(shapes))
        if missing or extra:
            raise ValueError(f"the bit plan does not match the model's linears: missing {missing[:5]}, unknown {extra[:5]}")
        for n, (out_f, in_f) in shapes.items():
            try:
                self.formats[n].validate_shape(out_f, in_f)
            except ValueError as exc:
                raise ValueError(f"bit plan, {n}: {exc}") from None
