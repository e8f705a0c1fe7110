"""Plan search: allocations that move fewer or more linears away from a base plan, each evaluated whole.

Per-linear scores add up; the model's loss does not, least of all at 2 bits, where every linear's error
changes what the others see. The search takes score sets (the ``local`` estimators give two: the expansion
at the base plan, which predicts small moves away from it well, and the one at full precision, which
predicts large ones better), allocates once per set and *move penalty* ``mu`` (added to every option but
the base format, in units of the set's median score magnitude: a large ``mu`` moves only what the budget
forces, ``mu = 0`` is the plain allocation), and keeps the plan whose whole quantized model has the lowest
NLL on the calibration windows (rounded the way its scores were: round-to-nearest, or GPTQ on each linear's
input second moment). The plan with the fewest moves, the base plan itself where it fits, is always among
those evaluated.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from omniq_lightning.mixed.allocate import Option, allocate
from omniq_lightning.mixed.sensitivity import nll, plan_weights
from omniq_lightning.quant import WeightFormat


def base_format(candidates: Sequence[WeightFormat], shapes: Mapping[str, tuple[int, int]], avg_bits: float
                ) -> WeightFormat:
    """The candidate that fits every linear and whose uniform plan is nearest ``avg_bits`` (the cheaper on a tie)."""
    total = sum(o * i for o, i in shapes.values())
    uniform = {c: sum(c.storage_bits(*s) for s in shapes.values()) / total for c in candidates
               if all(c.fits(i) for _, i in shapes.values())}
    if not uniform:
        raise ValueError("the local estimators expand around one format for every linear, and no candidate fits "
                         "them all: add a per-channel candidate (e.g. w2, w3, w4) or one whose group size divides "
                         "every width")
    return min(uniform, key=lambda c: (abs(uniform[c] - avg_bits), uniform[c]))


def penalised(options: Mapping[str, Sequence[Option]], base: WeightFormat, penalty: float) -> dict[str, list[Option]]:
    """``options`` with ``penalty`` added to every option but the base format."""
    return {n: [o if o.fmt == base else Option(o.fmt, o.bits, o.loss + penalty) for o in opts]
            for n, opts in options.items()}


def move_scale(options: Mapping[str, Sequence[Option]], base: WeightFormat) -> float:
    """The median magnitude of the scores of moves away from the base (the unit of the move penalties)."""
    values = [abs(o.loss) for opts in options.values() for o in opts if o.fmt != base]
    return statistics.median(values) if values else 0.0


def candidate_plans(options: Mapping[str, Sequence[Option]], budget_bits: int, base: WeightFormat,
                    penalties: Sequence[float]) -> list[tuple[float, dict[str, Option]]]:
    """One allocation per move penalty (in units of ``move_scale``), largest first; the first
    is always the plan with the fewest moves (the base plan itself where it fits the budget): its penalty,
    reported as ``None`` (``inf`` in the log), outweighs any difference of scores."""
    scale = move_scale(options, base)
    fewest = 2.0 * sum(max(abs(o.loss) for o in opts) for opts in options.values()) + 1.0
    plans = []
    for mu in [math.inf, *sorted(set(penalties), reverse=True)]:
        chosen = allocate(penalised(options, base, fewest if mu == math.inf else mu * scale), budget_bits)
        plans.append((mu, {n: next(x for x in options[n] if x.fmt == o.fmt) for n, o in chosen.items()}))  # unpenalised
    return plans


@torch.no_grad()
def plan_nll(model: nn.Module, formats: Mapping[str, WeightFormat], windows: torch.Tensor, device: torch.device,
             moments: Mapping[str, torch.Tensor], cache: Mapping | None = None) -> float:
    """The calibration NLL of the model with every planned linear rounded to its format (then restored)."""
    with plan_weights(model, formats, moments, cache):
        return nll(model, windows, device)


def search_plan(model: nn.Module, score_sets: Mapping[str, Mapping[str, Sequence[Option]]], budget_bits: int,
                base: WeightFormat, penalties: Sequence[float], windows: torch.Tensor, device: torch.device,
                moments: Mapping[str, torch.Tensor], progress: Callable[[str], None] = print,
                cache: Mapping | None = None) -> tuple[dict[str, Option], list[dict]]:
    """Of the candidate plans of every score set (``name -> options``), the one with the lowest calibration
    NLL, and a record of every plan evaluated (a plan two sets both give is evaluated once)."""
    records, best, seen = [], None, set()
    for scores, options in score_sets.items():
        for mu, chosen in candidate_plans(options, budget_bits, base, penalties):
            key = tuple(sorted((n, o.fmt) for n, o in chosen.items()))
            if key in seen:
                continue
            seen.add(key)
            value = plan_nll(model, {n: o.fmt for n, o in chosen.items()}, windows, device, moments, cache)
            moved = sum(o.fmt != base for o in chosen.values())
            records.append({"scores": scores, "penalty": None if math.isinf(mu) else mu, "moved": moved,
                            "predicted": round(sum(o.loss for o in chosen.values()), 6),
                            "calibration_nll": round(value, 6)})
            progress(f"plan search ({scores} scores): penalty {mu:g}, {moved} linears moved from the base, "
                     f"calibration NLL {value:.4f}")
            if best is None or value < best[0]:
                best = (value, chosen, len(records) - 1)
    assert best is not None
    for i, r in enumerate(records):
        r["chosen"] = i == best[2]
    return best[1], records


__all__ = ["base_format", "candidate_plans", "move_scale", "penalised", "plan_nll", "search_plan"]
