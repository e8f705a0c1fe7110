"""Activation statistics of a block on its calibration inputs: static quantizer ranges, and the per-channel
extremes at every transform site (RPTQ's clustering)."""

from __future__ import annotations

import torch

from omniq_lightning import distributed
from omniq_lightning.calib import ActivationCache
from omniq_lightning.nn import ActQuantizer, ClusterActQuantizer, QuantMatMul
from omniq_lightning.solvers.hooks import (
    activations_in_full_precision,
    full_precision_weights,
    run_block,
    run_with_input_hooks,
    weight_linears,
)
from omniq_lightning.transforms import QuantBlock, TransformSite

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def observe_static_ranges(qblock: QuantBlock, inputs: ActivationCache, ctx) -> None:
    """Record the ranges of the block's static activation quantizers (per tensor, per cluster) on its inputs."""
    static = [m for m in qblock.modules() if isinstance(m, (ActQuantizer, ClusterActQuantizer)) and m.static and m.active]
    if not static:
        return
    for m in static:
        m.reset_range()
        m.observing = True
    try:
        run_block(qblock, inputs, ctx)
    finally:
        for m in static:
            m.observing = False
    for m in static:  # every rank's samples seen
        distributed.min_(m.lo)
        distributed.max_(m.hi)


def _update(stats: Stats, key: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
    if key in stats:
        lo, hi = torch.minimum(stats[key][0], lo), torch.maximum(stats[key][1], hi)
    stats[key] = (lo, hi)


def site_activation(site: TransformSite) -> str:
    """The key of the activation a site's statistics describe: a linear's input by its name, or the attention's
    ``q``/``k`` (post-rotary) and ``v`` heads."""
    if site.location == "qk":
        return "qk"
    if site.location == "vo":
        return "v"
    return site.targets[0]


@torch.no_grad()
def site_statistics(qblock: QuantBlock, inputs: ActivationCache, ctx, sites: list[TransformSite]) -> Stats:
    """Per-channel min and max of every site's activation, the block in full precision: linear inputs ``[C]``;
    ``q``/``k``/``v`` per head and channel ``[heads, head_dim]`` (post-rotary, as the attention receives them).
    A linear that saw no token (an MoE expert) has no entry."""
    stats: Stats = {}

    def channels(name: str):
        def fn(x: torch.Tensor) -> None:
            x = x.detach().reshape(-1, x.shape[-1]).float()
            if x.shape[0]:
                _update(stats, name, x.amin(0), x.amax(0))

        return fn

    def heads(tag: str):
        def fn(t: torch.Tensor) -> None:
            t = t.detach().float().transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1])  # [heads, tokens, hd]
            _update(stats, tag, t.amin(1), t.amax(1))

        return fn

    keys = {site_activation(s) for s in sites}
    hooks = {name: channels(name) for name in keys - {"qk", "v"}}
    matmuls = [n for n, m in qblock.block.named_modules() if isinstance(m, QuantMatMul)]
    for name in matmuls:  # the quantizers of Q, K and V see them after the rotary embedding
        hooks |= {f"{name}.{tag}_quant": heads(tag) for tag in ("q", "k", "v")}
    with full_precision_weights(weight_linears(qblock).values()), activations_in_full_precision(qblock):
        run_with_input_hooks(qblock, inputs, ctx, hooks)
    return distributed.merge_ranges(stats)  # every rank's samples seen
