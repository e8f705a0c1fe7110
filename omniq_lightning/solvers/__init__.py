"""Closed-form block solvers every method may call: input hooks and sampling, Hessians, GPTQ on a block's grids,
AWQ's scale and clipping searches, activation statistics and static ranges."""

from omniq_lightning.solvers.awq import AWQ_LOCATIONS, awq_block, linear_inputs
from omniq_lightning.solvers.gptq import collect_hessians, column_quantizer, gptq_block
from omniq_lightning.solvers.hooks import (
    activations_in_full_precision,
    full_precision_weights,
    run_block,
    run_with_input_hooks,
    weight_linears,
)
from omniq_lightning.solvers.ranges import observe_static_ranges, site_statistics

__all__ = [
    "AWQ_LOCATIONS",
    "activations_in_full_precision",
    "awq_block",
    "collect_hessians",
    "column_quantizer",
    "full_precision_weights",
    "gptq_block",
    "linear_inputs",
    "observe_static_ranges",
    "run_block",
    "run_with_input_hooks",
    "site_statistics",
    "weight_linears",
]
