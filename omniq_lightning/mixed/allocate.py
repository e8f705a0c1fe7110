"""Bit allocation: one candidate format per linear, minimising the predicted loss under a total-bit budget.

A multiple-choice knapsack, solved by dynamic programming over the linears with Pareto pruning: after
each linear, only the partial plans that no other partial plan beats in both bits and loss are kept (the
optimal plan's every prefix is among them), and those that could no longer fit the budget are dropped.
The frontier is exact; past ``max_states`` partial plans it keeps, per slice of the bit range, the one with
the lowest loss (a bound on the approximation: one slice, ``budget / max_states`` bits). The plan's
bits are exact and checked against the budget, so the result never exceeds it; a last pass takes any
single upgrade that still fits and lowers the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from omniq_lightning.quant import WeightFormat


@dataclass(frozen=True)
class Option:
    fmt: WeightFormat
    bits: int  # exact storage bits of the linear in this format
    loss: float  # predicted loss increase (e.g. model NLL) when the linear takes this format


def _pareto(bits: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the states no other state beats in both bits and loss (sorted by bits)."""
    order = np.lexsort((loss, bits))
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], loss[order][:-1]]))
    return order[loss[order] < best_before]


def allocate(options: Mapping[str, Sequence[Option]], budget_bits: int, max_states: int = 20000) -> dict[str, Option]:
    """One option per linear with total bits <= ``budget_bits`` and the lowest total predicted loss."""
    names = list(options)
    opts = [list(options[n]) for n in names]
    cheapest = [min(o.bits for o in os_) for os_ in opts]
    if sum(cheapest) > budget_bits:
        raise ValueError(f"the budget is below the cheapest plan: every linear at its cheapest candidate needs "
                         f"{sum(cheapest)} bits, the budget allows {budget_bits}: raise quant.mixed.avg_bits or add a "
                         "cheaper candidate")
    rest = np.cumsum([0, *cheapest[::-1]])[::-1]  # rest[i]: the fewest bits linears i.. can take
    bits, loss = np.zeros(1, dtype=np.int64), np.zeros(1)
    parents: list[tuple[np.ndarray, np.ndarray]] = []
    for i, os_ in enumerate(opts):
        ob = np.array([o.bits for o in os_], dtype=np.int64)
        ol = np.array([o.loss for o in os_])
        cb = (bits[:, None] + ob[None]).ravel()
        cl = (loss[:, None] + ol[None]).ravel()
        fits = np.nonzero(cb + rest[i + 1] <= budget_bits)[0]
        keep = fits[_pareto(cb[fits], cl[fits])]
        if len(keep) > max_states:  # one state per slice of the bit range: the lowest loss in it
            slices = (cb[keep] * max_states) // (budget_bits + 1)
            # keep is sorted by bits with falling loss: the last state of each slice has its lowest loss
            last = len(keep) - 1 - np.unique(slices[::-1], return_index=True)[1]
            keep = keep[np.sort(last)]
        parents.append((keep // len(os_), keep % len(os_)))
        bits, loss = cb[keep], cl[keep]
    state = int(np.argmin(loss))
    chosen: dict[str, Option] = {}
    for i in range(len(names) - 1, -1, -1):
        parent, option = parents[i]
        chosen[names[i]] = opts[i][int(option[state])]
        state = int(parent[state])
    used = sum(o.bits for o in chosen.values())
    assert used <= budget_bits
    while True:  # any single upgrade that still fits and lowers the loss (only after slicing, in practice)
        best = None
        for n, os_ in options.items():
            for o in os_:
                extra = o.bits - chosen[n].bits
                if 0 < extra <= budget_bits - used and o.loss < chosen[n].loss:
                    gain = (chosen[n].loss - o.loss) / extra
                    if best is None or gain > best[0]:
                        best = (gain, n, o)
        if best is None:
            return {n: chosen[n] for n in names}
        _, n, o = best
        used += o.bits - chosen[n].bits
        chosen[n] = o
