"""Importance-based mixed precision: per-linear sensitivities, bit allocation under an average-bit budget, and
the plan (``bit_plan.json``) every method runs on, decided by a pass of the model-level stage."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omniq_lightning.mixed.allocate import Option, allocate
from omniq_lightning.mixed.plan import BitPlan, MixedSettings, parse_candidate
from omniq_lightning.mixed.search import base_format, search_plan
from omniq_lightning.mixed.sensitivity import LOCAL, SensitivityStore, input_moments, linear_shapes, sensitivities
from omniq_lightning.passes import ModelPass, PassContext, PassResult
from omniq_lightning.quant import QuantSpec

log = logging.getLogger(__name__)
PLAN_FILE, SENSITIVITY_FILE = "bit_plan.json", "sensitivity.json"


def quant_settings(cfg) -> tuple[QuantSpec, MixedSettings | None]:
    """The ``quant`` config as a ``QuantSpec`` and, when it has a ``mixed`` node (``quant=mixed``), the
    mixed-precision settings."""
    data = dict(cfg)
    mixed = data.pop("mixed", None)
    spec = QuantSpec.from_config(data)
    if mixed is None:
        return spec, None
    return spec, MixedSettings.from_config(mixed, spec.w_symmetric)


class MixedPrecisionPass(ModelPass):
    """The bit plan of the run: the user's (``quant.mixed.plan``), the one this output folder already holds
    (``bit_plan.json``, resume), or a new one from the sensitivities of every linear (cached in
    ``sensitivity.json``) and the allocator. A plan whose formats differ from the ones the finished blocks were
    calibrated on is caught by their fingerprints."""

    name = "bit_plan"

    def __init__(self, settings: MixedSettings) -> None:
        self.settings = settings

    def check_model(self, traits) -> None:
        if traits.experts:
            raise ValueError("quant=mixed does not support mixture-of-experts models yet: use a uniform quant preset")

    def run(self, ctx: PassContext) -> PassResult:
        mixed, shapes = self.settings, ctx.shapes
        local = mixed.sensitivity in LOCAL
        base = base_format(mixed.candidates, shapes, mixed.avg_bits) if local else None
        store = SensitivityStore(ctx.out_dir / SENSITIVITY_FILE, mixed.sensitivity, mixed.windows, base)
        for path in ([Path(mixed.plan)] if mixed.plan else []) + [ctx.out_dir / PLAN_FILE]:
            if path.is_file():
                plan = BitPlan.load(path)
                plan.check_covers(shapes)
                avg = plan.avg_bits(shapes)
                if avg > mixed.avg_bits + 1e-9:
                    raise ValueError(f"the bit plan {path} holds {avg:.4f} bits per weight, above the budget "
                                     f"quant.mixed.avg_bits={mixed.avg_bits}: raise the budget to at least {avg:.4f} "
                                     "or edit the plan")
                info = {"path": str(path), "avg_bits": avg, "source": "given" if mixed.plan else "resumed"}
                if not mixed.plan and store.scores:  # what the sensitivities behind the resumed plan cost
                    info["sensitivity_seconds"] = round(store.seconds, 3)
                if mixed.plan:  # the plan that runs is kept beside the run's results
                    plan.save(ctx.out_dir / PLAN_FILE, shapes)
                return self.result(plan, shapes, info)
        plan, info = self.allocate(ctx, base, store)
        return self.result(plan, shapes, info)

    @staticmethod
    def result(plan: BitPlan, shapes, info: dict) -> PassResult:
        """The plan decides formats only: each block's fingerprint holds its own linears' formats, so an edit
        invalidates the blocks it touches and no others."""
        return PassResult(formats=dict(plan.formats), info=info)

    def allocate(self, ctx: PassContext, base, store: SensitivityStore) -> tuple[BitPlan, dict]:
        mixed, shapes, device, model = self.settings, ctx.shapes, ctx.device, ctx.model
        windows = ctx.windows[: mixed.windows]
        t_moments = time.perf_counter()  # GPTQ rounding (local-gptq) needs every linear's input second moment
        moments = input_moments(model.to(device), windows, list(shapes), device) if mixed.sensitivity == "local-gptq" else {}
        t_moments = time.perf_counter() - t_moments
        cache: dict = {}  # roundings shared by the expansion and the plan search
        scores = sensitivities(model, shapes, mixed.candidates, windows, mixed.sensitivity, store, device,
                               progress=log.info, base=base, moments=moments, cache=cache)
        t_alloc = time.perf_counter()
        budget = int(mixed.avg_bits * sum(o * i for o, i in shapes.values()))
        info: dict = {}
        if base is not None:  # two score sets (the expansions at the base plan and at full precision), whole plans evaluated
            score_sets = {k: {n: [Option(c, c.storage_bits(*shapes[n]), s[j]) for c, s in scores[n].items()] for n in shapes}
                          for j, k in enumerate(("local", "full"))}
            chosen, info["search"] = search_plan(model, score_sets, budget, base, mixed.search_penalties, windows, device,
                                                 moments, progress=log.info, cache=cache)
            info["base"] = base.to_dict()
        else:
            chosen = allocate({n: [Option(c, c.storage_bits(*shapes[n]), s) for c, s in scores[n].items()]
                               for n in shapes}, budget)
        model.to("cpu")
        plan = BitPlan({n: o.fmt for n, o in chosen.items()}, mixed.avg_bits, mixed.sensitivity, mixed.candidates)
        plan.save(ctx.out_dir / PLAN_FILE, shapes)
        avg, seconds = plan.avg_bits(shapes), store.seconds + t_moments
        log.info("bit plan: %.4f bits per weight (budget %.4f), sensitivities (%s) in %.0f s", avg, mixed.avg_bits,
                 mixed.sensitivity, seconds)
        return plan, {"path": str(ctx.out_dir / PLAN_FILE), "avg_bits": avg, "source": "allocated",
                      "sensitivity_seconds": round(seconds, 3),
                      "allocation_seconds": round(time.perf_counter() - t_alloc, 3), **info}


__all__ = ["BitPlan", "MixedPrecisionPass", "MixedSettings", "Option", "allocate", "linear_shapes", "parse_candidate",
           "quant_settings"]
