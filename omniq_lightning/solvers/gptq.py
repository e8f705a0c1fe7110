"""GPTQ on the block rails: Hessians from the block's calibration inputs, then column-wise rounding of every
weight-quantized linear on its grid (its learned clipping included)."""

from __future__ import annotations

import torch

from omniq_lightning import distributed
from omniq_lightning.calib import ActivationCache
from omniq_lightning.calib.phases import phase
from omniq_lightning.nn import QuantLinear
from omniq_lightning.quant import GroupGrid
from omniq_lightning.quant.gptq import ColumnQuantizer, HessianAccumulator, gptq_quantize
from omniq_lightning.solvers.hooks import full_precision_weights, run_with_input_hooks, weight_linears
from omniq_lightning.transforms import QuantBlock


@torch.no_grad()
def collect_hessians(qblock: QuantBlock, inputs: ActivationCache, ctx) -> dict[str, HessianAccumulator]:
    """Each weight-quantized linear's input Hessian over all calibration samples (an MoE expert: over the
    tokens routed to it), with the block's weights in full precision (one pass, as GPTQ gathers a block's
    sub-layer inputs)."""
    linears = weight_linears(qblock)
    accs = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in linears.items()}

    def record(name: str, lin: QuantLinear):  # the input the weight multiplies, quantized as it runs
        return lambda x: accs[name].add(lin.act_quant(x) if lin.act_quant is not None else x)

    with full_precision_weights(linears.values()):
        run_with_input_hooks(qblock, inputs, ctx, {n: record(n, m) for n, m in linears.items()})
    return merge_hessians(accs)


def merge_hessians(accs: dict[str, HessianAccumulator]) -> dict[str, HessianAccumulator]:
    """Each Hessian over every rank's samples of a data-parallel run (the token-weighted mean of the ranks'), in
    place; one process's are returned as they are."""
    if not distributed.active():
        return accs
    for acc in accs.values():  # the same names in the same order on every rank
        total = acc.H.mul_(acc.n)
        distributed.sum_(total)
        (n,) = distributed.sum_floats(acc.n)
        acc.n = int(n)
        acc.H = total.div_(acc.n) if acc.n else total
    return accs


def column_quantizer(lin: QuantLinear) -> tuple[ColumnQuantizer, GroupGrid]:
    """The static column grid of a quantized linear (its LWC clipping included when present)."""
    return lin.wq.column_quantizer(lin.weight)


def gptq_block(qblock: QuantBlock, inputs: ActivationCache, ctx, damp: float, act_order: bool,
               blocksize: int) -> dict[str, float]:
    """Fold any LET transforms, then replace every weight-quantized linear's weight by its GPTQ solution. A
    linear that saw no calibration token (an MoE expert no token was routed to) has no Hessian: it is rounded
    to nearest on its grid instead, and counted."""
    qblock.fold_transforms()
    with phase("gptq hessians"):
        hessians = collect_hessians(qblock, inputs, ctx)
    with phase("gptq rounding"):
        without_tokens = round_linears(qblock, hessians, damp, act_order, blocksize)
    return {"linears_without_tokens": float(without_tokens)} if without_tokens else {}


def round_linears(qblock: QuantBlock, hessians: dict[str, HessianAccumulator], damp: float, act_order: bool,
                  blocksize: int) -> int:
    """GPTQ's rounding of every weight-quantized linear on its Hessian; returns how many had none."""
    without_tokens = 0
    for name, lin in weight_linears(qblock).items():
        if lin.wq.rounding is not None:
            raise ValueError("GPTQ rounding and learned rounding both decide the rounding: choose one")
        if hessians[name].n == 0:
            lin.fold()
            without_tokens += 1
            continue
        quantize, g = column_quantizer(lin)
        q = gptq_quantize(lin.weight, hessians[name].H, quantize, blocksize, damp, act_order)
        lin.set_codes(lin.wq.codes_on(q, g))
    return without_tokens
