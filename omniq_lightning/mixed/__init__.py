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
from omniq_lightning.mixed.search import base_format, search_plan
from omniq_lightning.mixed.sensitivity import LOCAL, SensitivityStore, input_moments, linear_shapes, sensitivities
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
    local = mixed.sensitivity in LOCAL
    base = base_format(mixed.candidates, shapes, mixed.avg_bits) if local else None
    store = SensitivityStore(out_dir / SENSITIVITY_FILE, mixed.sensitivity, mixed.windows, base)
    for path in ([Path(mixed.plan)] if mixed.plan else []) + [out_dir / PLAN_FILE]:
        if path.is_file():
            plan = BitPlan.load(path)
            plan.check_covers(shapes)
            info = {"path": str(path), "avg_bits": plan.avg_bits(shapes), "source": "given" if mixed.plan else "resumed"}
            if not mixed.plan and store.scores:  # what the sensitivities behind the resumed plan cost
                info["sensitivity_seconds"] = round(store.seconds, 3)
            return plan, info
    windows = windows[: mixed.windows]
    t_moments = time.perf_counter()  # GPTQ rounding (local-gptq) needs every linear's input second moment
    moments = input_moments(model.to(device), windows, list(shapes), device) if mixed.sensitivity == "local-gptq" else {}
    t_moments = time.perf_counter() - t_moments
    cache: dict = {}  # roundings shared by the expansion and the plan search
    scores = sensitivities(model, shapes, mixed.candidates, windows, mixed.sensitivity, store, device,
                           progress=log.info, base=base, moments=moments, cache=cache)
    t_alloc = time.perf_counter()
    budget = int(mixed.avg_bits * sum(o * i for o, i in shapes.values()))
    info: dict = {}
    if local:  # two score sets (the expansions at the base plan and at full precision), whole plans evaluated
        score_sets = {k: {n: [Option(c, c.storage_bits(*shapes[n]), s[j]) for c, s in scores[n].items()] for n in shapes}
                      for j, k in enumerate(("local", "full"))}
        chosen, info["search"] = search_plan(model, score_sets, budget, base, mixed.search_penalties, windows, device,
                                             moments, progress=log.info, cache=cache)
        info["base"] = base.to_dict()
    else:
        chosen = allocate({n: [Option(c, c.storage_bits(*shapes[n]), s) for c, s in scores[n].items()]
                           for n in shapes}, budget)
    plan = BitPlan({n: o.fmt for n, o in chosen.items()}, mixed.avg_bits, mixed.sensitivity, mixed.candidates)
    plan.save(out_dir / PLAN_FILE, shapes)
    avg, seconds = plan.avg_bits(shapes), store.seconds + t_moments
    log.info("bit plan: %.4f bits per weight (budget %.4f), sensitivities (%s) in %.0f s", avg, mixed.avg_bits,
             mixed.sensitivity, seconds)
    return plan, {"path": str(out_dir / PLAN_FILE), "avg_bits": avg, "source": "allocated",
                  "sensitivity_seconds": round(seconds, 3),
                  "allocation_seconds": round(time.perf_counter() - t_alloc, 3), **info}


__all__ = ["BitPlan", "MixedSettings", "Option", "allocate", "hull", "linear_shapes", "parse_candidate", "plan_for_run",
           "quant_settings"]
