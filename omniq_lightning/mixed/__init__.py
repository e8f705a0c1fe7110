"""Importance-based mixed precision: per-linear sensitivities, bit allocation under an average-bit budget, and
the plan (``bit_plan.json``) every method runs on."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from omniq_lightning.mixed.allocate import Option, allocate, hull
from omniq_lightning.mixed.plan import MIXED_KEYS, BitPlan, MixedSettings, parse_candidate
from omniq_lightning.mixed.sensitivity import SensitivityStore, linear_shapes, sensitivities
from omniq_lightning.quant import QuantSpec

log = logging.getLogger(__name__)
PLAN_FILE, SENSITIVITY_FILE = "bit_plan.json", "sensitivity.json"


def quant_settings(cfg) -> tuple[QuantSpec, MixedSettings | None]:
    """The ``quant`` config as a ``QuantSpec`` and, for ``quant=mixed``, its mixed-precision settings."""
    data = dict(cfg)
    mixed_keys = {k: data.pop(k) for k in MIXED_KEYS if k in data}
    spec = QuantSpec.from_config(data)
    if not mixed_keys:
        return spec, None
    if "avg_bits" not in mixed_keys:
        raise ValueError("a mixed-precision setting needs quant.avg_bits (the average bits per weight to fit)")
    return spec, MixedSettings.from_config(mixed_keys, spec.w_symmetric)


def plan_for_run(model: nn.Module, adapter, mixed: MixedSettings, windows: torch.Tensor, out_dir: Path,
                 device: torch.device) -> tuple[BitPlan, dict]:
    """The run's bit plan: the user's (``quant.plan``), the one this run already made (resume), or a new one
    from the sensitivities of every linear (cached in ``sensitivity.json``) and the allocator."""
    if not adapter.packed_export:
        raise ValueError("quant=mixed does not support mixture-of-experts models yet: use a uniform quant preset")
    shapes = linear_shapes(model, adapter)
    store = SensitivityStore(out_dir / SENSITIVITY_FILE, mixed.sensitivity, mixed.windows)
    for path in ([Path(mixed.plan)] if mixed.plan else []) + [out_dir / PLAN_FILE]:
        if path.is_file():
            plan = BitPlan.load(path)
            plan.check_covers(shapes)
            info = {"path": str(path), "avg_bits": plan.avg_bits(shapes), "source": "given" if mixed.plan else "resumed"}
            if not mixed.plan and store.scores:  # what the sensitivities behind the resumed plan cost
                info["sensitivity_seconds"] = round(store.seconds, 3)
            return plan, info
    scores = sensitivities(model, shapes, mixed.candidates, windows[: mixed.windows], mixed.sensitivity, store, device,
                           progress=log.info)
    t_alloc = time.perf_counter()
    options = {n: [Option(c, c.storage_bits(*shapes[n]), s) for c, s in scores[n].items()] for n in shapes}
    budget = int(mixed.avg_bits * sum(o * i for o, i in shapes.values()))
    chosen = allocate(options, budget)
    plan = BitPlan({n: o.fmt for n, o in chosen.items()}, mixed.avg_bits, mixed.sensitivity, mixed.candidates)
    plan.save(out_dir / PLAN_FILE, shapes)
    avg = plan.avg_bits(shapes)
    log.info("bit plan: %.4f bits per weight (budget %.4f), sensitivities (%s) in %.0f s", avg, mixed.avg_bits,
             mixed.sensitivity, store.seconds)
    return plan, {"path": str(out_dir / PLAN_FILE), "avg_bits": avg, "source": "allocated",
                  "sensitivity_seconds": round(store.seconds, 3),
                  "allocation_seconds": round(time.perf_counter() - t_alloc, 3)}


__all__ = ["BitPlan", "MixedSettings", "Option", "allocate", "hull", "linear_shapes", "parse_candidate", "plan_for_run",
           "quant_settings"]
