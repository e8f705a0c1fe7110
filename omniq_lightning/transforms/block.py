"""`QuantBlock`: a transformer block with quantized layers, its LWC and LET parameters, and folding."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omniq_lightning.nn import LETRouter, QuantLinear, WeightQuantizer
from omniq_lightning.quant import QuantSpec
from omniq_lightning.transforms.affine import AFFINE_LOCATIONS, AffinePair
from omniq_lightning.transforms.let import LETNorm, LETPair
from omniq_lightning.transforms.sites import LOCATIONS, TransformSite


@dataclass(frozen=True)
class OnlineRotations:
    """The rotations a quantized block applies online (QuaRot's R3 and R4; R1 and R2 fold into the weights in the
    model-level stage): ``qk``, one Hadamard on every query and key head after the rotary embedding (the key cache
    is stored rotated); ``down``, one on the down projection's input (its weight holds the inverse)."""

    qk: bool = False
    down: bool = False
    seed: int = 0


@dataclass(frozen=True)
class BlockSetup:
    """How to build a block's ``QuantBlock``: the spec its layers use, the diagonal equivalence transforms it gets
    (OmniQuant's LET, AWQ's and SmoothQuant's scales) and per-linear weight formats (a method's ``setup`` makes it).

    scale_locations: the site locations that get a diagonal transform: "norm", "vo", "qk", "up_down" (at the
      sites where a diagonal folds).
    scale_alpha: the SmoothQuant migration strength that initialises the scales.
    scale_shift: shifts where the source can absorb them (OPT), never where it cannot.
    formats: per-linear weight formats by name within the block (a mixed-precision plan); others use the spec's.
    rotations: the rotations the block applies online.
    affine_locations: the site locations that get a learned affine transform (``transforms/affine.py``).
    """

    spec: QuantSpec
    scale_locations: tuple[str, ...] = ()
    scale_alpha: float = 0.5
    scale_shift: bool = True
    formats: Mapping[str, Any] = field(default_factory=dict)
    rotations: OnlineRotations = field(default_factory=OnlineRotations)
    affine_locations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.scale_locations) - set(LOCATIONS)
        if unknown:
            raise ValueError(f"unknown site locations {sorted(unknown)}; locations are {LOCATIONS}")
        unknown = set(self.affine_locations) - set(AFFINE_LOCATIONS)
        if unknown:
            raise ValueError(f"no affine transforms at {sorted(unknown)}; affine locations are {AFFINE_LOCATIONS}")

    @property
    def scaled(self) -> bool:
        return bool(self.scale_locations)


class QuantBlock(nn.Module):
    """The original block with ``QuantLinear``/``QuantMatMul`` in place and LET pairs registered.

    ``quant_parameters()`` yields exactly the trainable tensors (LWC logits and LET factors);
    ``fold()`` writes the learned transforms and clipping into plain weights and returns the block.
    """

    def __init__(self, block: nn.Module, let_pairs: dict[str, LETPair], call: Callable,
                 sites: list[TransformSite] | None = None, affine_pairs: dict[str, AffinePair] | None = None) -> None:
        super().__init__()
        self.block = block
        self.let = nn.ModuleDict(let_pairs)  # diagonal transforms (LET, AWQ's and SmoothQuant's scales)
        self.affine = nn.ModuleDict(affine_pairs or {})  # learned dense transforms, applied after the diagonal ones
        self._call = call
        self.sites = list(sites or [])  # every transform site the adapter declares (RPTQ reorders on them)
        self.codes: dict[str, Any] = {}  # the stored codes of every quantized linear, once folded, by name
        self._learned: tuple[dict[str, torch.Tensor], dict[str, float]] | None = None

    def learned_tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors (clipping logits, LET factors, rounding offsets), by name, prefixed ``learned.``."""
        trainable = {id(p) for p in self.quant_parameters()}
        return {f"learned.{n}": p.detach().clone() for n, p in self.named_parameters() if id(p) in trainable}

    def learned_statistics(self) -> dict[str, float]:
        """Summary statistics of the learned clipping (sigmoid of the logits), rounding offsets and LET scales."""
        stats: dict[str, float] = {}
        wqs = [wq for wq in self.weight_quantizers() if wq.lwc_gamma is not None]
        if wqs:
            stats["clip_max_mean"] = torch.cat([torch.sigmoid(wq.lwc_gamma).flatten() for wq in wqs]).mean().item()
            stats["clip_min_mean"] = torch.cat([torch.sigmoid(wq.lwc_beta).flatten() for wq in wqs]).mean().item()
        clips = [m.act_quant.clip for m in self.quant_linears()
                 if m.act_quant is not None and getattr(m.act_quant, "clip", None) is not None]
        if clips:
            stats["act_clip_mean"] = torch.sigmoid(torch.cat([c.detach().flatten() for c in clips])).mean().item()
        offsets = [wq.rounding.flatten() for wq in self.weight_quantizers() if wq.rounding is not None]
        if offsets:  # how far learned rounding moved from round-to-nearest
            stats["rounding_offset_abs_mean"] = torch.cat(offsets).abs().mean().item()
        for name, pair in self.let.items():
            stats[f"let_{name}_scale_mean"] = pair.scale.detach().mean().item()
            stats[f"let_{name}_scale_max"] = pair.scale.detach().max().item()
        for name, pair in self.affine.items():  # how far the learned transform moved from the identity
            p = pair.transform.matrix()
            stats[f"affine_{name}_drift"] = (torch.linalg.norm(p - torch.eye(p.shape[0], dtype=p.dtype)) /
                                             p.shape[0] ** 0.5).item()
        return stats

    def record_learned(self) -> None:
        """Keep the learned tensors and their statistics as they are now, before a step that folds them (GPTQ
        rounding after training), for the block's record."""
        self._learned = (self.learned_tensors(), self.learned_statistics())

    def learned_record(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The recorded learned tensors and statistics, or the current ones if none were recorded."""
        return self._learned if self._learned is not None else (self.learned_tensors(), self.learned_statistics())

    def quant_linears(self) -> list[QuantLinear]:
        return [m for m in self.block.modules() if isinstance(m, QuantLinear)]

    def weight_quantizers(self) -> list[WeightQuantizer]:
        return [m.wq for m in self.quant_linears() if m.wq is not None]

    def lwc_parameters(self) -> Iterator[nn.Parameter]:
        """The clipping logits: the weights' (LWC) and the activations' (LAC)."""
        for wq in self.weight_quantizers():
            yield from wq.lwc_parameters()
        for m in self.quant_linears():
            if m.act_quant is not None and getattr(m.act_quant, "clip", None) is not None:
                yield m.act_quant.clip

    def rounding_parameters(self) -> Iterator[nn.Parameter]:
        for wq in self.weight_quantizers():
            yield from wq.rounding_parameters()

    def let_parameters(self) -> Iterator[nn.Parameter]:
        return iter(list(self.let.parameters()))

    def affine_parameters(self) -> Iterator[nn.Parameter]:
        return iter(list(self.affine.parameters()))

    def quant_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable tensors: clipping logits, LET factors, affine transform factors, and rounding offsets where
        enabled."""
        yield from self.lwc_parameters()
        yield from self.let_parameters()
        yield from self.affine_parameters()
        yield from self.rounding_parameters()

    @property
    def transformed(self) -> bool:
        return bool(len(self.let) or len(self.affine))

    def apply_let(self) -> None:
        """Recompute every transformed weight from the current transform factors (clears stale ones first): the
        diagonal pairs, then the affine ones on top."""
        for m in self.block.modules():
            if isinstance(m, (QuantLinear, LETNorm, LETRouter)):
                m.clear_let()
        for pair in [*self.let.values(), *self.affine.values()]:
            pair.apply(self.block)

    def forward(self, hidden: torch.Tensor, ctx) -> torch.Tensor:
        if self.transformed:
            self.apply_let()
        return self._call(self.block, hidden, ctx)

    @torch.no_grad()
    def fold_transforms(self) -> None:
        """Write the transforms into the (still unquantized) weights and norms; no pairs remain (an affine
        transform's online part stays in its readers' input-transform slots, frozen)."""
        if self.transformed:
            self.apply_let()
        for name, m in list(self.block.named_modules()):
            if isinstance(m, (QuantLinear, LETRouter)):
                m.fold_transform()
            elif isinstance(m, LETNorm):
                self.block.set_submodule(name, m.fold())
        self.let = nn.ModuleDict()
        for pair in self.affine.values():
            pair.transform.requires_grad_(False)
        self.affine = nn.ModuleDict()

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Fold LET, LWC and learned rounding into the weights; returns the block with plain norms, and plain
        linears wherever the input is not quantized (layers that quantize their input keep a folded QuantLinear).
        The stored codes of every quantized linear stay in ``codes``, by name within the block."""
        self.fold_transforms()
        for name, m in list(self.block.named_modules()):
            if isinstance(m, QuantLinear):
                m.fold()
                if m.codes is not None:
                    self.codes[name] = m.codes
                if m.act_quant is None and m.input_transform is None:
                    self.block.set_submodule(name, m.to_linear())
        return self.block

    def extra_repr(self) -> str:
        return f"LET pairs: {list(self.let.keys()) or 'none'}, affine: {list(self.affine.keys()) or 'none'}"
