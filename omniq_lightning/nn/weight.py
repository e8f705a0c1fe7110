"""`WeightQuantizer`: how one linear's weight is quantized, and the learnable state that goes with it."""

from __future__ import annotations

import torch
from torch import nn

from omniq_lightning.quant import QuantizedWeight, WeightFormat, fake_quant_weight, quantize_weight
from omniq_lightning.quant.functional import check_ranges
from omniq_lightning.quant.gptq import format_column_quantizer
from omniq_lightning.quant.weight import NO_CLIP_LOGIT, clip_logit, codes_of, mse_clip_logits  # noqa: F401 - re-exported

ROUNDING_LIMIT = 0.5  # learned rounding offsets live in [-0.5, 0.5] grid steps


class WeightQuantizerBase(nn.Module):
    """What every weight quantizer is to the rest of the library (a format kind's quantizer, ``nn.formats``):

    * ``fmt``: the weight format; ``forward(w)``: ``w`` fake-quantized (differentiable where it learns);
      ``quantize(w)``: the stored codes of what ``forward`` computed (``codes.dequantize() == forward(w)``);
    * its trainable tensors by optimizer group: ``lwc_parameters()`` (clipping), ``rounding_parameters()``;
    * ``project()`` after each optimizer step, ``set_ranges(ranges)`` (the range convention a method trains with).
    A quantizer with nothing to learn keeps the defaults.
    """

    def __init__(self, fmt) -> None:
        super().__init__()
        self.fmt = fmt
        self.lwc_gamma: nn.Parameter | None = None
        self.lwc_beta: nn.Parameter | None = None
        self.rounding: nn.Parameter | None = None

    def lwc_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.lwc_gamma, self.lwc_beta) if p is not None]

    def rounding_parameters(self) -> list[nn.Parameter]:
        return [] if self.rounding is None else [self.rounding]

    def project(self) -> None:
        """Keep the learned tensors in their domain (after every optimizer step)."""

    def set_ranges(self, ranges: str) -> None:
        check_ranges(ranges)

    def quantize(self, w: torch.Tensor):
        raise NotImplementedError

    # --- the "grid" capability (nn.formats): searches over clipping, AWQ's scales --------------------------------
    @property
    def clip_group(self) -> int:
        """Input columns per clipping logit (one logit per group of a row)."""
        raise NotImplementedError

    def fake_quant_with(self, w: torch.Tensor, gamma: torch.Tensor | None = None,
                        beta: torch.Tensor | None = None) -> torch.Tensor:
        """``w`` fake-quantized in this format with the given clipping logits (none: the full ranges), without
        the learned state."""
        raise NotImplementedError

    @torch.no_grad()
    def mse_clip_logits(self, w: torch.Tensor, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
        """Per group, the clipping logit (clip ratios from 1 down to ``1 - max_shrink``) that minimises the group's
        squared weight error: a data-free start for learned clipping. ``[out, in / clip_group]``."""
        out, group = w.shape[0], self.clip_group
        best_err = torch.full((out, w.shape[1] // group), float("inf"), device=w.device)
        best = torch.empty_like(best_err)
        for i in range(n_grid + 1):
            lg = torch.full_like(best_err, clip_logit(1.0 - max_shrink * i / n_grid))
            err = (self.fake_quant_with(w, lg, lg) - w).float().pow(2).reshape(out, -1, group).sum(-1)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, lg, best)
        return best

    # --- the "columns" capability: GPTQ's column-wise rounding on a static grid --------------------------------
    def column_quantizer(self, w: torch.Tensor):
        """``(quantize_column(col, j), grid)``: rounds a column onto the static grid of original column ``j`` of
        ``w`` (clipped by this quantizer's logits); :meth:`codes_on` reads the codes of a result off that grid."""
        raise NotImplementedError

    def codes_on(self, w_hat: torch.Tensor, grid):
        """The stored codes of a weight already on ``grid`` (exact, and checked to be)."""
        raise NotImplementedError


class WeightQuantizer(WeightQuantizerBase):
    """Owns a weight's format (bits, group size, symmetry, grid) and its learnable quantization state:

    * ``lwc_gamma`` / ``lwc_beta``: Learnable Weight Clipping logits, one per group (max and min side);
    * ``rounding``: learned rounding offsets, one per weight (off unless :meth:`enable_rounding`).

    ``forward(w)`` fake-quantizes ``w`` (fused on CUDA where possible); :meth:`quantize` returns the integer
    codes and grid that ``forward`` computed, for storage and export.
    """

    def __init__(self, fmt: WeightFormat, out_features: int, in_features: int, lwc: bool = True,
                 lwc_init: float = 4.0, device: torch.device | str | None = None) -> None:
        fmt.validate_shape(out_features, in_features)
        super().__init__(fmt)
        self.out_features, self.in_features = out_features, in_features
        self.ranges = "detached"  # or "released" (OmniQuant's differentiable min/max), set by the method
        if lwc:
            init = torch.full((out_features, self.n_groups), float(lwc_init), device=device)
            self.lwc_gamma = nn.Parameter(init.clone())
            self.lwc_beta = nn.Parameter(init.clone())

    @property
    def n_groups(self) -> int:
        return self.in_features // (self.fmt.group_size or self.in_features)

    def enable_rounding(self) -> None:
        """Learn a rounding offset per weight (AdaRound / SignRound style), starting at round-to-nearest."""
        if self.rounding is None:
            device = None if self.lwc_gamma is None else self.lwc_gamma.device
            self.rounding = nn.Parameter(torch.zeros(self.out_features, self.in_features, device=device))

    def disable_lwc(self) -> None:
        self.lwc_gamma = self.lwc_beta = None

    def set_ranges(self, ranges: str) -> None:
        self.ranges = check_ranges(ranges)

    @torch.no_grad()
    def set_clip(self, gamma_logits: torch.Tensor | float, beta_logits: torch.Tensor | float | None = None) -> None:
        """Set the LWC logits (a tensor of one per group, or one value for all); beta defaults to gamma."""
        if self.lwc_gamma is None:
            raise ValueError("this weight quantizer has no clipping (quant.lwc=false)")
        beta_logits = gamma_logits if beta_logits is None else beta_logits
        for p, v in ((self.lwc_gamma, gamma_logits), (self.lwc_beta, beta_logits)):
            p.copy_(torch.as_tensor(v, dtype=p.dtype, device=p.device).expand_as(p))

    @torch.no_grad()
    def project(self) -> None:
        """Keep the learned rounding offsets inside [-0.5, 0.5] (run after every optimizer step)."""
        if self.rounding is not None:
            self.rounding.clamp_(-ROUNDING_LIMIT, ROUNDING_LIMIT)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.fmt, self.lwc_gamma, self.lwc_beta, self.rounding, self.ranges)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        """The integer codes and grid of ``w`` (``dequantize()`` equals ``forward(w)`` in float32)."""
        return quantize_weight(w, self.fmt, self.lwc_gamma, self.lwc_beta, self.rounding)

    @property
    def clip_group(self) -> int:
        return self.fmt.group_size or self.in_features

    def fake_quant_with(self, w, gamma=None, beta=None) -> torch.Tensor:
        return fake_quant_weight(w, self.fmt, gamma, beta)

    def mse_clip_logits(self, w: torch.Tensor, n_grid: int = 20, max_shrink: float = 0.5) -> torch.Tensor:
        return mse_clip_logits(w, self.fmt, n_grid, max_shrink)

    def column_quantizer(self, w: torch.Tensor):
        return format_column_quantizer(w, self.fmt, self.lwc_gamma, self.lwc_beta)

    def codes_on(self, w_hat: torch.Tensor, grid) -> QuantizedWeight:
        return codes_of(w_hat, grid, self.fmt)

    def extra_repr(self) -> str:
        f = self.fmt
        grouping = f"g{f.group_size}" if f.group_size else "per-channel"
        grid = "" if f.grid == "uniform" else f" {f.grid}(p={f.grid_exponent:g})"
        learned = [n for n, p in (("LWC", self.lwc_gamma), ("rounding", self.rounding)) if p is not None]
        return f"w{f.bits} {grouping} {'sym' if f.symmetric else 'asym'}{grid}" + "".join(f" +{n}" for n in learned)
