"""RPTQ on the block rails: cluster each activation site's channels, fold the reorders that fold exactly, quantize
each cluster with its own (static) range, then quantize the weights (RTN, GPTQ or OmniQuant's LWC).

Per block: (1) per-channel min and max of every site's activation over the calibration tokens, with the
block in full precision (``ReorderDecl.stats``: a linear's input, or the attention's post-rotary q/k and v);
(2) k-means of the channels' (max, min) points (R2: (q max, k max, q min, k min) per key head) with a fixed
seed; (3) R3 and R5's permutations folded into the weights; (4) per-cluster activation quantizers on the
linears' inputs and on Q, K and V (the key/value cache), static by default (ranges observed on the
calibration tokens, or their per-channel moving average as in the released code) or dynamic per token within
each cluster; (5) the weights. See ``transforms/reorder.py`` for what is folded where and why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn

from omniq_lightning.calib import ActivationCache, BlockDataModule, BlockRun
from omniq_lightning.methods.base import Method, full_precision_weights, weight_linears
from omniq_lightning.methods.gptq import gptq_block
from omniq_lightning.nn import ActQuantizer, ClusterActQuantizer, QuantLinear, QuantMatMul
from omniq_lightning.nn.act import check_observer
from omniq_lightning.quant import QuantSpec
from omniq_lightning.quant.gptq import check_damp
from omniq_lightning.quant.spec import NO_QUANT_BITS, check_bits
from omniq_lightning.transforms import BlockPlan, QuantBlock, ReorderDecl
from omniq_lightning.transforms.reorder import (
    cluster_labels,
    expand_to_query_heads,
    head_labels,
    head_permutation,
    permutation,
    permute_columns,
    permute_rows,
    range_points,
)

WEIGHTS = ("rtn", "gptq", "omniquant")
Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _update(stats: Stats, key: str, lo: torch.Tensor, hi: torch.Tensor) -> None:
    if key in stats:
        lo, hi = torch.minimum(stats[key][0], lo), torch.maximum(stats[key][1], hi)
    stats[key] = (lo, hi)


@contextlib.contextmanager
def activations_in_full_precision(qblock: QuantBlock) -> Iterator[None]:
    """While active, no activation or key/value quantizer of the block quantizes."""
    quantizers = [m for m in qblock.modules() if isinstance(m, (ActQuantizer, ClusterActQuantizer))]
    saved = [m.bits for m in quantizers]
    for m in quantizers:
        m.bits = NO_QUANT_BITS
    try:
        yield
    finally:
        for m, b in zip(quantizers, saved, strict=True):
            m.bits = b


@torch.no_grad()
def site_statistics(qblock: QuantBlock, inputs: ActivationCache, ctx, sites: list[ReorderDecl]) -> Stats:
    """Per-channel min and max of every site's activation, the block in full precision: linear inputs ``[C]``;
    ``q``/``k``/``v`` per head and channel ``[heads, head_dim]`` (post-rotary, as the attention receives them)."""
    stats: Stats = {}
    handles = []
    for name in {s.stats for s in sites if s.stats not in ("qk", "v")}:
        def hook(_m, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            _update(stats, name, x.amin(0), x.amax(0))

        handles.append(qblock.block.get_submodule(name).register_forward_pre_hook(hook))

    def observe(query, key, value):
        for tag, t in (("q", query), ("k", key), ("v", value)):
            t = t.detach().float().transpose(0, 1).reshape(t.shape[1], -1, t.shape[-1])  # [heads, tokens, hd]
            _update(stats, tag, t.amin(1), t.amax(1))

    matmuls = [m for m in qblock.modules() if isinstance(m, QuantMatMul)]
    for m in matmuls:
        m.observer = observe
    try:
        with full_precision_weights(weight_linears(qblock).values()), activations_in_full_precision(qblock):
            for j in range(len(inputs)):
                qblock(inputs[j].unsqueeze(0).float(), ctx)
    finally:
        for h in handles:
            h.remove()
        for m in matmuls:
            m.observer = None
    return stats


class RPTQ(Method):
    name = "rptq"

    def __init__(self, weights: str = "gptq", clusters: int = 32, head_clusters: int = 4, dynamic: bool = False,
                 observer: str = "minmax", ema_decay: float = 0.99, norm_bits: int | None = None, seed: int = 0,
                 damp: float = 0.01, act_order: bool = False, epochs: int = 10) -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"method.weights must be one of {WEIGHTS}, got {weights!r}")
        if clusters < 1 or head_clusters < 1:
            raise ValueError(f"method.clusters and method.head_clusters must be positive, got {clusters}, {head_clusters}")
        if norm_bits is not None:
            check_bits("method.norm_bits", norm_bits)
        check_observer(observer, ema_decay)
        self.observer, self.ema_decay = observer, ema_decay
        self.weights, self.clusters, self.head_clusters, self.dynamic = weights, clusters, head_clusters, dynamic
        self.norm_bits, self.seed, self.epochs = norm_bits, seed, epochs
        self.damp, self.act_order = check_damp(damp), act_order
        self.spec: QuantSpec | None = None

    def validate(self, spec: QuantSpec) -> None:
        if spec.weight_only:
            raise ValueError(f"RPTQ clusters activation channels, so it needs activation or KV-cache quantization "
                             f"(quant=w4a8, w4a4, w4a4kv, w3a3kv, ...), not {spec.name}")

    def plan(self, spec: QuantSpec, family: str, let_for_weight_only: bool) -> BlockPlan:
        self.validate(spec)
        self.spec = spec
        return BlockPlan(replace(spec, lwc=self.weights == "omniquant"))

    def describe(self) -> dict:
        return {"weights": self.weights, "clusters": self.clusters, "head_clusters": self.head_clusters,
                "dynamic": self.dynamic, "observer": self.observer, "ema_decay": self.ema_decay,
                "norm_bits": self.norm_bits, "seed": self.seed}

    # --- the reorder ----------------------------------------------------------------------------------------
    def quantizer(self, bits: int, labels: torch.Tensor, n: int) -> ClusterActQuantizer:
        return ClusterActQuantizer(bits, labels, n, self.spec.a_symmetric, self.dynamic, self.observer, self.ema_decay)

    def cluster_site(self, qblock: QuantBlock, site: ReorderDecl, stats: Stats) -> None:
        """Cluster one site, fold its permutation where it folds, and give its activations their quantizers."""
        spec, block = self.spec, qblock.block
        a_bits = spec.a_bits
        if site.kind == "inputs":
            lo, hi = stats[site.stats]
            labels = cluster_labels(range_points(lo, hi), self.clusters, self.seed)
            bits = a_bits if self.norm_bits is None or a_bits == NO_QUANT_BITS else max(self.norm_bits, a_bits)
            self.set_input_quantizers(block, site.targets, bits, labels, int(labels.max()) + 1)
        elif site.kind == "qk":
            q_lo, q_hi = (t.view(site.n_kv, site.rep, -1) for t in stats["q"])
            k_lo, k_hi = stats["k"]
            points = torch.stack([q_hi.amax(1), k_hi, q_lo.amin(1), k_lo], dim=-1)  # [n_kv, hd, 4]
            labels = head_labels(points, self.head_clusters, self.seed)  # ids h * c + j per key head
            c = int(labels.max()) + 1
            per_q = labels.repeat_interleave(site.rep, 0) + (torch.arange(site.n_kv * site.rep) % site.rep)[:, None] * c
            for attn in (m for m in block.modules() if isinstance(m, QuantMatMul)):
                if attn.q_quant.active:
                    attn.q_quant = self.quantizer(a_bits, per_q[:, None, :], c * site.rep)
                if attn.k_quant.active:
                    attn.k_quant = self.quantizer(spec.kv_bits, labels[:, None, :], c)
        elif site.stats == "v":  # R3: value heads, folded into v rows and o columns
            lo, hi = stats["v"]
            labels = head_labels(range_points(lo, hi), self.head_clusters, self.seed)  # [n_kv, hd]
            perm = head_permutation(labels)
            for name in site.sources:
                permute_rows(block.get_submodule(name), perm)
            for name in site.targets:
                permute_columns(block.get_submodule(name), expand_to_query_heads(perm, site.n_kv, site.rep, site.head_dim))
            sorted_labels = torch.sort(labels, dim=1).values  # contiguous clusters after the permutation
            c = int(labels.max()) + 1
            for attn in (m for m in block.modules() if isinstance(m, QuantMatMul)):
                if attn.v_quant.active:
                    attn.v_quant = self.quantizer(spec.kv_bits, sorted_labels[:, None, :], c)
            per_q = sorted_labels.repeat_interleave(site.rep, 0) + (torch.arange(site.n_kv * site.rep) % site.rep)[:, None] * c
            self.set_input_quantizers(block, site.targets, a_bits, per_q.reshape(-1), c * site.rep)
        else:  # R5: folded into the producing linears' rows and the consuming linear's columns
            lo, hi = stats[site.stats]
            labels = cluster_labels(range_points(lo, hi), self.clusters, self.seed)
            perm = permutation(labels)
            for name in site.sources:
                permute_rows(block.get_submodule(name), perm)
            for name in site.targets:
                permute_columns(block.get_submodule(name), perm)
            self.set_input_quantizers(block, site.targets, a_bits, labels[perm], int(labels.max()) + 1)

    def set_input_quantizers(self, block: nn.Module, names: tuple[str, ...], bits: int, labels: torch.Tensor,
                             n: int) -> None:
        for name in names:
            lin = block.get_submodule(name)
            if isinstance(lin, QuantLinear) and lin.act_quant is not None and bits != NO_QUANT_BITS:
                lin.act_quant = self.quantizer(bits, labels, n)

    def calibrate(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> dict[str, float]:
        if not qblock.reorder_sites:
            raise ValueError("RPTQ: this model family declares no reorder sites (the LLaMA family, Gemma and OPT do)")
        stats = site_statistics(qblock, data.inputs, run.ctx, qblock.reorder_sites)
        for site in qblock.reorder_sites:
            self.cluster_site(qblock, site, stats)
        observe_ranges(qblock, data.inputs, run.ctx)  # static cluster ranges, before the weights see them
        if self.weights == "gptq":
            return gptq_block(qblock, data.inputs, run.ctx, self.damp, self.act_order, blocksize=128)
        if self.weights == "omniquant":
            from omniq_lightning.methods.omniquant import OmniQuant

            return OmniQuant(recipe="detached", epochs=self.epochs, let=False).train(qblock, data, run)
        return {}


@torch.no_grad()
def observe_ranges(qblock: QuantBlock, inputs: ActivationCache, ctx) -> None:
    """Record the ranges of the block's static per-cluster quantizers on the calibration inputs."""
    static = [m for m in qblock.modules() if isinstance(m, ClusterActQuantizer) and m.static and m.active]
    for m in static:
        m.reset_range()
        m.observing = True
    try:
        for j in range(len(inputs)):
            qblock(inputs[j].unsqueeze(0).float(), ctx)
    finally:
        for m in static:
            m.observing = False
