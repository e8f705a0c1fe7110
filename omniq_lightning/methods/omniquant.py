"""OmniQuant: learnable weight clipping (LWC) and learnable equivalent transformation (LET), trained block
by block to match the full-precision block's outputs; one ``Trainer.fit`` per block.

Every choice of gradient-based PTQ is a setting of the same ``BlockLightningModule`` (``method.<name>``;
``null`` takes the recipe's value, ``method.recipe`` names the recipe):

* loss: ``mse`` | ``mse_channel`` | ``mse_token`` | ``cosine``, plus ``aug_loss``;
* degrees of freedom: clipping (``quant.lwc``), LET (``let``), learned rounding offsets (``learn_rounding``);
* optimizer: ``adamw`` | ``sgd`` | ``signsgd``; ``schedule``: ``constant`` | ``linear`` | ``cosine`` per step;
  ``lr_budget``: the step count the learning rates are meant for (fewer steps scale them up by
  ``lr_budget / steps``, so a short protocol can still move the clipping); ``keep_best``;
* initialisation: ``statistics`` (LWC logits at ``quant.lwc_init``, LET from SmoothQuant / OS+ statistics),
  ``minmax`` (no clipping), ``mse`` (per-group weight-MSE clipping search), ``awq`` (AWQ's scale and
  clipping searches);
* ``ranges``: ``detached`` | ``released`` (OmniQuant's differentiable min/max), ``let_min_scale``
  (OmniQuant's |s| >= 1e-2 truncation; 0 = off);
* after training: ``rounding``: ``nearest`` | ``gptq`` (GPTQ on the learned grid, LET folded first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from omniq_lightning.calib import BlockDataModule, BlockRun, TrainSettings
from omniq_lightning.calib.fit import fit_block
from omniq_lightning.methods.base import DataNeeds, Method, ModelTraits
from omniq_lightning.nn import NO_CLIP_LOGIT, ActQuantizer
from omniq_lightning.quant import QuantSpec
from omniq_lightning.quant.functional import check_ranges
from omniq_lightning.quant.gptq import check_damp
from omniq_lightning.solvers import AWQ_LOCATIONS, awq_block, gptq_block
from omniq_lightning.transforms import BlockSetup, QuantBlock
from omniq_lightning.transforms.affine import AFFINE_LOCATIONS

LET_CHOICES = ("auto", True, False)
LET_LOCATIONS = ("norm", "vo", "qk")  # OmniQuant's released pairs: norm -> linears, v -> o, q / k
INITS = ("statistics", "minmax", "mse", "awq")
ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class Recipe:
    """Every OmniQuant setting; a recipe fills those the config leaves null."""

    epochs: int
    lwc_lr: float
    let_lr: float | str  # "auto": the released W4A4 LLaMA recipe where it applies (see OmniQuant.let_recipe)
    round_lr: float
    weight_decay: float
    let: str | bool
    let_alpha: float | str
    aug_loss: bool
    loss: str
    learn_rounding: bool
    affine: bool
    affine_lr: float
    optimizer: str
    schedule: str
    lr_budget: int | None
    keep_best: bool
    patience: int | None  # with keep_best: stop a block's training once its calibration loss stalls this many epochs
    init: str
    ranges: str
    let_min_scale: float
    rounding: str


# The released OmniQuant code (OpenGVLab/OmniQuant): AdamW, lwc 1e-2, let 5e-3 (1e-3 / alpha 0.75 for LLaMA
# W4A4), 20 epochs, no schedule, differentiable ranges, |s| >= 1e-2, LWC logits from 4.0, LET from
# SmoothQuant / OS+ statistics, the last iterate.
RELEASED = Recipe(epochs=20, lwc_lr=1e-2, let_lr="auto", round_lr=5e-3, weight_decay=0.0, let="auto", let_alpha="auto",
                  aug_loss=False, loss="mse", learn_rounding=False, affine=False, affine_lr=5e-3, optimizer="adamw",
                  schedule="constant",
                  lr_budget=None, keep_best=False, patience=None, init="statistics", ranges="released", let_min_scale=1e-2,
                  rounding="nearest")
RECIPES: dict[str, Recipe] = {
    "released": RELEASED,
    # this project's calibration before the best-practice study: detached ranges, no truncation
    "detached": Recipe(**{**RELEASED.__dict__, "ranges": "detached", "let_min_scale": 0.0}),
}
# This project's default, from the best-practice study (benchmarks/RESULTS.md, "Gradient-based PTQ"): clipping
# and LET start from AWQ's grid search instead of min/max statistics, the best iterate on the calibration loss
# is kept (a step that makes the block worse is never the answer), and the trained weights are rounded by GPTQ
# against the block's own inputs. The trainable set stays the clipping logits and LET factors.
RECIPES["default"] = Recipe(**{**RELEASED.__dict__, "init": "awq", "keep_best": True, "rounding": "gptq"})
# Opt-in: a per-weight rounding offset learned with the clipping (AdaRound / SignRound's degree of freedom).
RECIPES["learned-rounding"] = Recipe(**{**RELEASED.__dict__, "init": "awq", "keep_best": True,
                                        "learn_rounding": True})
SETTINGS = tuple(f.name for f in fields(Recipe))


def budget_scale(lr_budget: int | None, steps: int) -> float:
    """How much the learning rates grow when a protocol takes fewer optimizer steps than they were set for."""
    return 1.0 if not lr_budget or steps >= lr_budget else lr_budget / max(steps, 1)


class OmniQuant(Method):
    name = "omniquant"

    def __init__(self, recipe: str = "default", gptq_damp: float = 0.01, gptq_act_order: bool = False,
                 batch_size: int = 1, name: str | None = None, tag: str | None = None, **settings: Any) -> None:
        super().__init__(name=name, tag=tag)
        if recipe not in RECIPES:
            raise ValueError(f"method.recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise TypeError(f"unexpected settings {unknown}")
        base = RECIPES[recipe].__dict__
        self.recipe_name = recipe
        self.r = Recipe(**{k: base[k] if settings.get(k) is None else settings[k] for k in SETTINGS})
        self.check(self.r)
        self.gptq_damp, self.gptq_act_order = check_damp(gptq_damp), gptq_act_order
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"method.batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.resolved: dict[str, Any] = {}

    @staticmethod
    def check(r: Recipe) -> None:
        if r.let not in LET_CHOICES:
            raise ValueError(f"method.let must be one of auto, true, false; got {r.let!r}")
        if r.epochs < 0:
            raise ValueError(f"method.epochs must be 0 or more, got {r.epochs}")
        lrs = [r.lwc_lr, r.round_lr, r.affine_lr] + ([] if r.let_lr == "auto" else [r.let_lr])
        if any(isinstance(lr, str) or lr <= 0 for lr in lrs):
            raise ValueError(f"method.lwc_lr, let_lr, affine_lr and round_lr must be positive (let_lr may be auto), got "
                             f"{r.lwc_lr}, {r.let_lr}, {r.affine_lr}, {r.round_lr}")
        if r.let_alpha != "auto" and (isinstance(r.let_alpha, str) or not 0.0 <= r.let_alpha <= 1.0):
            raise ValueError(f"method.let_alpha must be auto or in [0, 1], got {r.let_alpha}")
        if r.init not in INITS:
            raise ValueError(f"method.init must be one of {INITS}, got {r.init!r}")
        if r.rounding not in ROUNDINGS:
            raise ValueError(f"method.rounding must be one of {ROUNDINGS}, got {r.rounding!r}")
        if r.rounding == "gptq" and r.learn_rounding:
            raise ValueError("method.rounding=gptq and method.learn_rounding=true both decide the rounding: choose one")
        check_ranges(r.ranges)
        if r.let_min_scale < 0:
            raise ValueError(f"method.let_min_scale must be 0 (off) or positive, got {r.let_min_scale}")
        if r.lr_budget is not None and r.lr_budget < 1:
            raise ValueError(f"method.lr_budget must be a positive step count or null, got {r.lr_budget}")
        # validates those names, and patience against keep_best
        TrainSettings(loss=r.loss, optimizer=r.optimizer, schedule=r.schedule, keep_best=r.keep_best, patience=r.patience)

    # --- the recipe as it applies to a model and a setting ---------------------------------------------------
    def let_recipe(self, spec: QuantSpec, recipe_family: str) -> tuple[float, float]:
        """LET learning rate and SmoothQuant alpha: the released code's W4A4 LLaMA recipe (1e-3, 0.75)
        where it applies, (5e-3, 0.5) otherwise; explicit settings win."""
        w4a4_llama = recipe_family == "llama" and spec.quantizes_activations and spec.a_bits <= 4
        lr = (1e-3 if w4a4_llama else 5e-3) if self.r.let_lr == "auto" else float(self.r.let_lr)
        alpha = (0.75 if w4a4_llama else 0.5) if self.r.let_alpha == "auto" else float(self.r.let_alpha)
        return lr, alpha

    def format_needs(self) -> frozenset[str]:
        needs = {"quantizer"}
        if self.r.init in ("awq", "mse") or self.r.learn_rounding:
            needs.add("grid")
        if self.r.rounding == "gptq":
            needs.add("columns")
        return frozenset(needs)

    def data_needs(self) -> DataNeeds:
        return DataNeeds(augmented_targets=bool(self.r.aug_loss), batch_size=self.batch_size, trains=True)

    def setup(self, spec: QuantSpec, traits: ModelTraits) -> BlockSetup:
        let_lr, alpha = self.let_recipe(spec, traits.recipe_family)
        let = self.r.let
        if let == "auto":
            let = (not spec.weight_only) or traits.let_for_weight_only
        self.resolved = {"recipe": self.recipe_name, **self.r.__dict__, "let": bool(let) or self.r.init == "awq",
                         "let_lr": let_lr, "let_alpha": alpha}
        affine = AFFINE_LOCATIONS if self.r.affine else ()
        if self.r.init == "awq":  # AWQ's scales live on its sites, without shifts
            return BlockSetup(spec, scale_locations=AWQ_LOCATIONS, scale_alpha=alpha, scale_shift=False,
                              affine_locations=affine)
        return BlockSetup(spec, scale_locations=LET_LOCATIONS if let else (), scale_alpha=alpha, affine_locations=affine)

    def describe(self) -> dict:
        return {**self.resolved, "batch_size": self.batch_size, "gptq_damp": self.gptq_damp,
                "gptq_act_order": self.gptq_act_order}

    # --- one block ----------------------------------------------------------------------------------------------
    def prepare(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> None:
        """Degrees of freedom, range convention and initial values, before training."""
        for m in qblock.modules():
            if isinstance(m, ActQuantizer):
                m.ranges = self.r.ranges
        for wq in qblock.weight_quantizers():
            wq.set_ranges(self.r.ranges)
        for pair in qblock.let.values():
            pair.min_scale = float(self.r.let_min_scale)
        init = self.r.init
        if init == "awq":
            awq_block(qblock, data.inputs, run.ctx, n_grid=20, clip=any(True for _ in qblock.lwc_parameters()),
                      max_shrink=0.5)
        elif init in ("minmax", "mse"):
            if len(qblock.let):
                qblock.apply_let()  # clipping is searched on the transformed weights
            for lin in qblock.quant_linears():
                if lin.wq is not None and lin.wq.lwc_gamma is not None:
                    lin.wq.set_clip(NO_CLIP_LOGIT if init == "minmax" else lin.wq.mse_clip_logits(lin.effective()[0]))
        if self.r.learn_rounding:
            for wq in qblock.weight_quantizers():
                wq.enable_rounding()

    def calibrate(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> dict[str, float]:
        self.prepare(qblock, data, run)
        stats = self.train(qblock, data, run)
        if self.r.rounding == "gptq":
            qblock.record_learned()  # GPTQ folds the transforms and the clipping into the weights
            stats |= gptq_block(qblock, data.inputs, run.ctx, self.gptq_damp, self.gptq_act_order, blocksize=128)
        return stats

    def train_settings(self, data: BlockDataModule) -> TrainSettings:
        steps = self.r.epochs * math.ceil(len(data.inputs) / data.batch_size)
        scale = budget_scale(self.r.lr_budget, steps)
        let_lr = self.resolved.get("let_lr", 5e-3)
        return TrainSettings(lrs={"lwc": self.r.lwc_lr * scale, "let": let_lr * scale, "affine": self.r.affine_lr * scale,
                                  "rounding": self.r.round_lr * scale},
                             weight_decay=self.r.weight_decay, loss=self.r.loss, optimizer=self.r.optimizer,
                             schedule=self.r.schedule, total_steps=steps, keep_best=self.r.keep_best,
                             patience=self.r.patience)

    def train(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> dict[str, float]:
        if self.r.epochs == 0 or not any(True for _ in qblock.quant_parameters()):
            return {}
        return fit_block(qblock, data, run, self.train_settings(data), self.r.epochs)
