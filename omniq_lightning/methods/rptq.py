"""RPTQ on the block rails: cluster each activation site's channels, fold the reorders that fold exactly, quantize
each cluster with its own (static) range, then quantize the weights (RTN, GPTQ or OmniQuant's LWC).

Per block: (1) per-channel min and max of every site's activation over the calibration tokens, with the
block in full precision (``solvers.site_statistics``: a linear's input, or the attention's post-rotary q/k and v);
(2) k-means of the channels' (max, min) points (R2: (q max, k max, q min, k min) per key head) with a fixed
seed; (3) R3 and R5's permutations folded into the weights; (4) per-cluster activation quantizers on the
linears' inputs and on Q, K and V (the key/value cache), static by default (ranges observed on the
calibration tokens, or their per-channel moving average as in the released code) or dynamic per token within
each cluster; (5) the weights. See ``transforms/reorder.py`` for what is folded where and why.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from omniq_lightning.calib import BlockDataModule, BlockRun, TrainSettings
from omniq_lightning.calib.fit import fit_block
from omniq_lightning.calib.phases import phase
from omniq_lightning.methods.base import DataNeeds, Method, ModelTraits
from omniq_lightning.nn import ClusterActQuantizer, QuantLinear, QuantMatMul
from omniq_lightning.nn.act import check_observer
from omniq_lightning.quant import QuantSpec
from omniq_lightning.quant.gptq import check_damp
from omniq_lightning.quant.spec import NO_QUANT_BITS, check_bits
from omniq_lightning.solvers import gptq_block, observe_static_ranges, site_statistics
from omniq_lightning.solvers.ranges import Stats, site_activation
from omniq_lightning.transforms import BlockSetup, QuantBlock, TransformSite
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
LOCATIONS = ("norm", "qk", "vo", "up_down")  # R1 and R4, R2, R3, R5


class RPTQ(Method):
    name = "rptq"

    def __init__(self, weights: str = "gptq", clusters: int = 32, head_clusters: int = 4, dynamic: bool = False,
                 observer: str = "minmax", ema_decay: float = 0.99, norm_bits: int | None = None, seed: int = 0,
                 damp: float = 0.01, act_order: bool = False, epochs: int = 10, lwc_lr: float = 1e-2,
                 **label) -> None:
        super().__init__(**label)
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
        if epochs < 0 or not lwc_lr > 0:
            raise ValueError(f"method.epochs must be 0 or more and method.lwc_lr positive, got {epochs}, {lwc_lr}")
        self.lwc_lr = float(lwc_lr)
        self.damp, self.act_order = check_damp(damp), act_order
        self.spec: QuantSpec | None = None

    def validate(self, spec: QuantSpec) -> None:
        if spec.weight_only:
            raise ValueError(f"RPTQ clusters activation channels, so it needs activation or KV-cache quantization "
                             f"(quant=w4a8, w4a4, w4a4kv, w3a3kv, ...), not {spec.name}")

    def check_model(self, traits: ModelTraits) -> None:
        fused = sorted({s.name for s in traits.sites if s.source_rows is not None})
        if fused:
            raise ValueError(f"RPTQ cannot reorder this model: its sites {fused} sit on fused projections (Phi-3's "
                             "qkv_proj / gate_up_proj), whose rows it does not permute. Use method=omniquant, gptq or "
                             "smoothquant for this family")
        if traits.experts:
            raise ValueError("RPTQ does not reorder mixture-of-experts blocks yet: use method=omniquant or gptq")
        missing = sorted(set(LOCATIONS) - {s.location for s in traits.sites})
        if missing:
            raise ValueError(f"RPTQ needs a site at every one of {LOCATIONS}; this family declares none at {missing}")

    def format_needs(self) -> frozenset[str]:
        return frozenset({"quantizer", "columns"} if self.weights == "gptq" else {"quantizer"})

    def data_needs(self) -> DataNeeds:
        return DataNeeds(trains=self.epochs > 0, moment_bytes=8 if self.weights == "gptq" else 0)

    def check_world(self, ranks: int) -> None:
        if self.observer == "ema_minmax":
            raise ValueError("method.observer=ema_minmax averages the ranges in the order the samples come, which "
                             f"{ranks} ranks cannot reproduce: use method.observer=minmax, or run one process")
        if self.epochs > 0:
            raise ValueError(f"RPTQ trains its clipping on one sample per step (method.epochs={self.epochs}), a step "
                             f"{ranks} ranks cannot share: set method.epochs=0, or run one process")

    def setup(self, spec: QuantSpec, traits: ModelTraits) -> BlockSetup:
        self.spec = spec
        return BlockSetup(replace(spec, lwc=self.weights == "omniquant"))

    def describe(self) -> dict:
        return {"weights": self.weights, "clusters": self.clusters, "head_clusters": self.head_clusters,
                "dynamic": self.dynamic, "observer": self.observer, "ema_decay": self.ema_decay,
                "norm_bits": self.norm_bits, "seed": self.seed, "damp": self.damp, "act_order": self.act_order,
                "epochs": self.epochs, "lwc_lr": self.lwc_lr}

    # --- the reorder ----------------------------------------------------------------------------------------
    def quantizer(self, bits: int, labels: torch.Tensor, n: int) -> ClusterActQuantizer:
        return ClusterActQuantizer(bits, labels, n, self.spec.a_symmetric, self.dynamic, self.observer, self.ema_decay)

    def cluster_site(self, qblock: QuantBlock, site: TransformSite, stats: Stats) -> None:
        """Cluster one site, fold its permutation where it folds, and give its activations their quantizers."""
        spec, block = self.spec, qblock.block
        a_bits = spec.a_bits
        key = site_activation(site)
        if site.location != "qk" and key not in stats:
            return  # an MoE expert that saw no calibration token
        rotated_down = site.location == "up_down" and any(
            getattr(block.get_submodule(t), "input_transform", None) is not None for t in site.targets)
        if site.location == "norm" or rotated_down:  # R1, R4 (and R5 under an online rotation): clustered in place
            lo, hi = stats[key]
            labels = cluster_labels(range_points(lo, hi), self.clusters, self.seed)
            bits = (a_bits if rotated_down or self.norm_bits is None or a_bits == NO_QUANT_BITS
                    else max(self.norm_bits, a_bits))
            self.set_input_quantizers(block, site.targets, bits, labels, int(labels.max()) + 1)
        elif site.location == "qk":  # R2: in place, per key head
            h = site.heads
            q_lo, q_hi = (t.view(h.n_kv, h.rep, -1) for t in stats["q"])
            k_lo, k_hi = stats["k"]
            points = torch.stack([q_hi.amax(1), k_hi, q_lo.amin(1), k_lo], dim=-1)  # [n_kv, hd, 4]
            labels = head_labels(points, self.head_clusters, self.seed)  # ids h * c + j per key head
            c = int(labels.max()) + 1
            per_q = labels.repeat_interleave(h.rep, 0) + (torch.arange(h.n_kv * h.rep) % h.rep)[:, None] * c
            for attn in (m for m in block.modules() if isinstance(m, QuantMatMul)):
                if attn.q_quant.active:
                    attn.q_quant = self.quantizer(a_bits, per_q[:, None, :], c * h.rep)
                if attn.k_quant.active:
                    attn.k_quant = self.quantizer(spec.kv_bits, labels[:, None, :], c)
        elif site.location == "vo":  # R3: value heads, folded into v rows and o columns
            h = site.heads
            lo, hi = stats["v"]
            labels = head_labels(range_points(lo, hi), self.head_clusters, self.seed)  # [n_kv, hd]
            perm = head_permutation(labels)
            for name in site.producers:
                permute_rows(block.get_submodule(name), perm)
            for name in site.targets:
                permute_columns(block.get_submodule(name), expand_to_query_heads(perm, h.n_kv, h.rep, h.head_dim))
            sorted_labels = torch.sort(labels, dim=1).values  # contiguous clusters after the permutation
            c = int(labels.max()) + 1
            for attn in (m for m in block.modules() if isinstance(m, QuantMatMul)):
                if attn.v_quant.active:
                    attn.v_quant = self.quantizer(spec.kv_bits, sorted_labels[:, None, :], c)
            per_q = sorted_labels.repeat_interleave(h.rep, 0) + (torch.arange(h.n_kv * h.rep) % h.rep)[:, None] * c
            self.set_input_quantizers(block, site.targets, a_bits, per_q.reshape(-1), c * h.rep)
        else:  # R5 (up_down): folded into the producing linears' rows and the consuming linear's columns
            lo, hi = stats[key]
            labels = cluster_labels(range_points(lo, hi), self.clusters, self.seed)
            perm = permutation(labels)
            for name in site.producers:
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
        sites = [s for s in qblock.sites if s.location in LOCATIONS]
        with phase("rptq statistics"):
            stats = site_statistics(qblock, data.inputs, run.ctx, sites)
        with phase("rptq clustering"):
            for site in sites:
                self.cluster_site(qblock, site, stats)
        observe_static_ranges(qblock, data.inputs, run.ctx)  # static cluster ranges, before the weights see them
        if self.weights == "gptq":
            return gptq_block(qblock, data.inputs, run.ctx, self.damp, self.act_order, blocksize=128)
        if self.weights == "omniquant":
            return self.train_clipping(qblock, data, run)
        return {}

    def train_clipping(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> dict[str, float]:
        """LWC on the reordered block with its cluster quantizers in place: the block-output MSE, AdamW at
        ``lwc_lr``, detached ranges, the last iterate (OmniQuant's ``detached`` recipe without LET)."""
        if self.epochs == 0 or not any(True for _ in qblock.quant_parameters()):
            return {}
        steps = self.epochs * math.ceil(len(data.inputs) / data.batch_size)
        settings = TrainSettings(lrs={"lwc": self.lwc_lr}, total_steps=steps)
        return fit_block(qblock, data, run, settings, self.epochs)
