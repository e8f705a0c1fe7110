"""The memory plan: what the CPU, the device and the disk hold at their peaks during a run, from the model's config
alone (the model built on the meta device: no weights read) and the run's settings.

Every figure is a sum of named terms, so a plan explains itself and a refusal can name the setting that would make
the run fit. The terms are estimates of what the code holds (the block in float32 while it is calibrated, the
activation caches, a method's per-block second-moment matrices, the logits of evaluation); ``benchmarks/scale.py``
sets them against measured peaks. The CPU figure starts from the process's resident memory when the plan is made
(Python, torch and the libraries already imported).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

GiB = 2**30
FLOAT32 = 4
TOKENIZER_BYTES_PER_CHAR = 130  # a fast tokenizer's memory for one long text (measured: WikiText-2 test, 1.3 MB)


@dataclass(frozen=True)
class ModelSizes:
    """A model's sizes, read from the model on the meta device.

    params / outside_params: all parameters / those outside the blocks (embedding, final norm, head: a tied head
    once); block_params: the largest block's; moment_elements: the largest sum over one block's quantized linears of
    ``in_features ** 2`` (their input Hessians); quantized_params: all quantized linears' weights (their codes).
    """

    n_blocks: int
    hidden: int
    intermediate: int  # the widest linear input of a block (the MLP's down projection)
    heads: int
    vocab: int
    dtype_bytes: int
    params: int
    outside_params: int
    block_params: int
    moment_elements: int
    quantized_params: int
    dtype: torch.dtype = torch.float32
    head_params: int = 0  # an untied head's (a lazily held model reads it only to evaluate and export)

    @classmethod
    def of(cls, model: nn.Module, adapter) -> ModelSizes:
        prefix = adapter.blocks_prefix(model) + "."
        named = dict(model.named_parameters())  # a tied head's tensor once
        outside = sum(p.numel() for n, p in named.items() if not n.startswith(prefix))
        blocks = adapter.blocks(model)
        per_block, moments, quantized, widest = [], [], 0, 0
        seen: dict[tuple, list[nn.Linear]] = {}  # blocks of one structure are prepared once
        for block in blocks:
            key = tuple((n, tuple(p.shape)) for n, p in block.named_parameters())
            if key not in seen:
                prepared = adapter.prepare_block(copy.deepcopy(block))  # the quantizers' shape (MoE experts unfused)
                keep = adapter.keep_full_precision(prepared)
                seen[key] = [m for n, m in prepared.named_modules() if isinstance(m, nn.Linear) and n not in keep]
            linears = seen[key]
            per_block.append(sum(p.numel() for p in block.parameters()))
            moments.append(sum(m.in_features**2 for m in linears))
            quantized += sum(m.in_features * m.out_features for m in linears)
            widest = max([widest, *(m.in_features for m in linears)])
        head = model.get_submodule(adapter.model_sites(model).head)
        head_params = 0 if adapter.model_sites(model).tied else sum(p.numel() for p in head.parameters())
        config = model.config.get_text_config()
        dtype = next(model.parameters()).dtype
        return cls(n_blocks=len(blocks), hidden=adapter.hidden_size(model), intermediate=widest,
                   heads=int(config.num_attention_heads), vocab=int(config.vocab_size),
                   dtype_bytes=torch.empty(0, dtype=dtype).element_size(), params=sum(p.numel() for p in named.values()),
                   outside_params=outside, block_params=max(per_block), moment_elements=max(moments),
                   quantized_params=quantized, dtype=dtype, head_params=head_params)

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes


@dataclass(frozen=True)
class PlanSettings:
    """The settings a memory plan reads (from the run's config and its method's :class:`DataNeeds`)."""

    nsamples: int
    seqlen: int
    cache_bytes: int  # per element of an activation cache
    caches: int  # activation caches of [nsamples, seqlen, hidden]: 3, or 4 with augmented targets
    cache_where: str  # device | cpu | pinned | disk | auto
    device: str  # cpu | cuda
    lazy: bool
    batch_size: int = 1
    moment_bytes: int = 0
    trains: bool = False
    eval_seqlen: int = 2048
    eval_batch: int = 1
    eval_windows: int = 1  # windows held at once by a block-by-block evaluation (lazy)
    export_packed: bool = False
    runtime_bytes: int = 0  # the process before the run (interpreter, libraries)
    corpus_chars: int = 0  # the text of the calibration and evaluation corpora (their tokenization's memory)
    ranks: int = 1  # data-parallel ranks (torchrun): each holds nsamples / ranks samples' caches
    ranks_per_node: int = 1  # ranks sharing one machine's CPU memory and disk

    @property
    def caches_on_device(self) -> bool:
        return self.cache_where == "device" or (self.cache_where == "auto" and self.device == "cuda")


@dataclass
class Peak:
    """What one place holds at its peak: named terms in bytes."""

    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {size(v)}" for k, v in sorted(self.terms.items(), key=lambda kv: -kv[1]) if v)
        return f"{size(self.total)} ({parts})"


def size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


@dataclass
class MemoryPlan:
    """Peaks of the CPU, the device (a CUDA device; None when the run is on the CPU) and the disk."""

    cpu: Peak
    device: Peak | None
    disk: Peak
    sizes: ModelSizes
    settings: PlanSettings

    def to_dict(self) -> dict[str, Any]:
        def gib(p: Peak | None):
            return None if p is None else {"total_gib": round(p.total / GiB, 3),
                                           "terms_gib": {k: round(v / GiB, 3) for k, v in p.terms.items()}}
        return {"cpu": gib(self.cpu), "device": gib(self.device), "disk": gib(self.disk),
                "model": {"params": self.sizes.params, "blocks": self.sizes.n_blocks,
                          "weights_gib": round(self.sizes.weight_bytes / GiB, 3)}}

    def describe(self) -> str:
        lines = [f"memory plan ({self.sizes.params / 1e9:.3g}B parameters, {self.sizes.n_blocks} blocks, "
                 f"{'lazy' if self.settings.lazy else 'whole'} model, calibration on {self.settings.device}"
                 + (f", {self.settings.ranks} ranks: CPU and disk per node of {self.settings.ranks_per_node}, device "
                    "per rank" if self.settings.ranks > 1 else "") + "):",
                 f"  CPU    {self.cpu.describe()}"]
        if self.device is not None:
            lines.append(f"  device {self.device.describe()}")
            if not self.settings.lazy:
                lines.append(f"         evaluation: accelerate places the model ({size(self.sizes.weight_bytes)}) over "
                             "the devices, what does not fit offloaded to the CPU, then the disk")
        lines.append(f"  disk   {self.disk.describe()}")
        return "\n".join(lines)


def block_work(sizes: ModelSizes, s: PlanSettings) -> dict[str, int]:
    """What calibrating one block holds where it runs: its weights in float32 (the block, its quantized copy and the
    folded result), a method's second moments, a training step's gradients and saved activations, and one
    forward's activations (a batch of tokens through the MLP and the attention scores)."""
    block = sizes.block_params * FLOAT32
    tokens = s.batch_size * s.seqlen
    forward = tokens * (6 * sizes.hidden + 3 * sizes.intermediate) * FLOAT32
    if s.device != "cuda":  # the CPU's attention materializes the scores
        forward += s.batch_size * sizes.heads * s.seqlen**2 * FLOAT32
    terms = {"block in float32 (x3)": 3 * block, "activations": forward}
    if s.moment_bytes:
        terms["second moments"] = sizes.moment_elements * s.moment_bytes
    if s.trains:
        terms["gradients and optimizer"] = 2 * block
        terms["activations"] = 4 * forward  # saved for backward
    return terms


def evaluation_work(sizes: ModelSizes, s: PlanSettings) -> int:
    """Evaluation's logits (as computed, in float32, and the loss's log-probabilities) and one block's activations;
    block by block (lazy), also the windows' hidden states."""
    tokens = s.eval_batch * s.eval_seqlen
    logits = 3 * tokens * sizes.vocab * FLOAT32
    attention = s.eval_batch * sizes.heads * s.eval_seqlen**2 * FLOAT32
    held = s.eval_windows * s.eval_seqlen * sizes.hidden * sizes.dtype_bytes if s.lazy else 0
    return logits + attention + held


def plan_memory(sizes: ModelSizes, s: PlanSettings) -> MemoryPlan:
    """The peaks of a calibration run (:func:`block_work` on the device, the model where it is held, the caches
    where they live; then evaluation and export)."""
    caches = s.caches * (s.nsamples // s.ranks) * s.seqlen * sizes.hidden * s.cache_bytes  # one rank's
    one_block = sizes.block_params * sizes.dtype_bytes
    held = ((sizes.outside_params - sizes.head_params) * sizes.dtype_bytes + one_block) if s.lazy else sizes.weight_bytes
    work = block_work(sizes, s)
    evaluation = evaluation_work(sizes, s) + (sizes.head_params * sizes.dtype_bytes if s.lazy else 0)
    cpu = Peak({"runtime": s.runtime_bytes, "model": held,
                "tokenized corpora": s.corpus_chars * TOKENIZER_BYTES_PER_CHAR})  # kept by the allocator after
    device = None
    if s.device == "cuda":
        device = Peak({**work, **({"activation caches": caches} if s.caches_on_device else {})})
        if s.lazy:  # evaluated block by block: one block and the logits; a whole model is placed by accelerate
            device.terms["evaluation (beyond calibration)"] = max(0, one_block + evaluation - device.total)
    else:
        work["evaluation (beyond calibration)"] = max(0, evaluation - sum(work.values()))
        cpu.terms.update(work)
    if s.cache_where in ("cpu", "pinned") or (s.cache_where == "auto" and s.device != "cuda"):
        cpu.terms["activation caches"] = caches
    state = sizes.n_blocks * sizes.block_params * FLOAT32 + sizes.quantized_params  # folded blocks + 8-bit codes
    disk = Peak({"run state": state, "fake-quant export": sizes.weight_bytes})
    if s.export_packed:
        disk.terms["packed export"] = sizes.outside_params * sizes.dtype_bytes + sizes.quantized_params
    if s.cache_where == "disk":
        disk.terms["activation caches"] = caches * s.ranks  # calib.cache_dir in the output folder all ranks share
    if s.ranks_per_node > 1:  # every rank of a node is a process of its own, holding all of the above
        cpu = Peak({k: v * s.ranks_per_node for k, v in cpu.terms.items()})
    return MemoryPlan(cpu, device, disk, sizes, s)


def resident_bytes() -> int:
    """This process's resident memory now (Linux; 0 where it cannot be read)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def shortfalls(plan: MemoryPlan, free: dict[str, int]) -> list[str]:
    """Each place whose planned peak exceeds what ``free`` says it has (keys cpu, device, disk), with the settings
    that would make it fit."""
    out = []
    for where, peak in (("cpu", plan.cpu), ("device", plan.device), ("disk", plan.disk)):
        if peak is None or where not in free or peak.total <= free[where]:
            continue
        fixes = list(fixes_for(plan, where, peak, free[where]))
        out.append(f"the {where} needs {peak.describe()} where {size(free[where])} is free"
                   + (f": use {'; or '.join(fixes)}" if fixes else ""))
    return out


def fixes_for(plan: MemoryPlan, where: str, peak: Peak, free: int) -> Iterable[str]:
    """Settings that lower ``peak`` (of ``where``) below ``free``, the cheapest first."""
    s, over = plan.settings, peak.total - free
    model = peak.terms.get("model", 0)
    if where == "cpu" and not s.lazy:
        lazy = (plan.sizes.outside_params - plan.sizes.head_params + plan.sizes.block_params) * plan.sizes.dtype_bytes
        if model - lazy >= over:
            yield "model.lazy=true (blocks read from the checkpoint's shards in turn)"
    caches = peak.terms.get("activation caches", 0)
    if caches and where != "disk":
        if caches >= over:
            yield "calib.cache=disk (with calib.cache_dir on a disk with room)"
        per_sample = caches // (s.nsamples // s.ranks)  # of one rank's share
        fewer = s.nsamples - s.ranks * -(-over // per_sample)
        if fewer >= 1:
            yield f"calib.nsamples={fewer} or fewer"
    if where == "device" and caches and caches >= over:
        yield "calib.cache=cpu"
    if where == "device" and caches:  # each rank caches its share of the samples
        per_rank = caches * s.ranks  # at one rank
        for ranks in range(s.ranks + 1, s.nsamples + 1):
            splits = s.nsamples % ranks == 0 and (not s.trains or s.batch_size % ranks == 0)
            if splits and caches - per_rank // ranks >= over:
                yield (f"more ranks: torchrun with {ranks} ranks (--nproc_per_node and --nnodes), each caching "
                       f"{s.nsamples // ranks} samples")
                break
    if where == "disk":
        yield "an output_dir on a disk with more room"
