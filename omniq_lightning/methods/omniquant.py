"""OmniQuant: learnable weight clipping (LWC) and learnable equivalent transformation (LET), trained
block by block with AdamW to match the full-precision block's outputs; one ``Trainer.fit`` per block.

Compositions (config): ``init: awq`` starts LET scales and clipping from AWQ's searches instead of
SmoothQuant/OS+ statistics; ``rounding: gptq`` replaces round-to-nearest by GPTQ on the grid of the
learned clipping, after the learned transforms are folded.
"""

from __future__ import annotations

import lightning as L

from omniq_lightning.calib import AtomicCheckpointIO, BlockDataModule, BlockLightningModule, BlockRun, EpochCheckpoint
from omniq_lightning.methods.awq import awq_block
from omniq_lightning.methods.base import BlockPlan, Method
from omniq_lightning.methods.gptq import gptq_block
from omniq_lightning.quant import QuantSpec
from omniq_lightning.quant.gptq import check_damp
from omniq_lightning.transforms import QuantBlock

LET_CHOICES = ("auto", True, False)
INITS = ("statistics", "awq")
ROUNDINGS = ("nearest", "gptq")


class OmniQuant(Method):
    name = "omniquant"

    def __init__(self, epochs: int = 20, lwc_lr: float = 1e-2, let_lr: float | str = "auto", weight_decay: float = 0.0,
                 let: str | bool = "auto", let_alpha: float | str = "auto", aug_loss: bool = False,
                 init: str = "statistics", rounding: str = "nearest", gptq_damp: float = 0.01,
                 gptq_act_order: bool = False) -> None:
        if let not in LET_CHOICES:
            raise ValueError(f"method.let must be one of auto, true, false; got {let!r}")
        if epochs < 0:
            raise ValueError(f"method.epochs must be 0 or more, got {epochs}")
        if lwc_lr <= 0 or (let_lr != "auto" and (isinstance(let_lr, str) or let_lr <= 0)):
            raise ValueError(f"method.lwc_lr and method.let_lr must be positive (let_lr may be auto), got {lwc_lr} and {let_lr}")
        if let_alpha != "auto" and (isinstance(let_alpha, str) or not 0.0 <= let_alpha <= 1.0):
            raise ValueError(f"method.let_alpha must be auto or in [0, 1], got {let_alpha}")
        self.epochs, self.lwc_lr, self.let_lr, self.weight_decay = epochs, lwc_lr, let_lr, weight_decay
        self.let, self.let_alpha, self.aug_loss = let, let_alpha, aug_loss
        if init not in INITS:
            raise ValueError(f"method.init must be one of {INITS}, got {init!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"method.rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.init, self.rounding = init, rounding
        self.resolved_let_lr = 5e-3 if let_lr == "auto" else float(let_lr)  # plan() applies the recipe
        self.gptq_damp, self.gptq_act_order = check_damp(gptq_damp), gptq_act_order

    def recipe(self, spec: QuantSpec, family: str) -> tuple[float, float]:
        """LET learning rate and SmoothQuant alpha: the released code's W4A4 LLaMA recipe (1e-3, 0.75)
        where it applies, (5e-3, 0.5) otherwise; explicit settings win."""
        w4a4_llama = family == "llama" and spec.quantizes_activations and spec.a_bits <= 4
        lr = (1e-3 if w4a4_llama else 5e-3) if self.let_lr == "auto" else float(self.let_lr)
        alpha = (0.75 if w4a4_llama else 0.5) if self.let_alpha == "auto" else float(self.let_alpha)
        return lr, alpha

    def plan(self, spec: QuantSpec, family: str, let_for_weight_only: bool) -> BlockPlan:
        self.resolved_let_lr, alpha = self.recipe(spec, family)
        if self.init == "awq":  # AWQ's scales live on the norm and v -> o pairs, without shifts
            return BlockPlan(spec, let=True, let_alpha=alpha, let_kinds=("norm", "linear"), let_shift=False)
        let = self.let
        if let == "auto":
            let = (not spec.weight_only) or let_for_weight_only
        return BlockPlan(spec, let=bool(let), let_alpha=alpha)

    def calibrate(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> None:
        if self.init == "awq":
            awq_block(qblock, data.inputs, run.ctx, n_grid=20, clip=qblock_has_lwc(qblock),
                      max_shrink=0.5)
        self.train(qblock, data, run)
        if self.rounding == "gptq":
            gptq_block(qblock, data.inputs, run.ctx, self.gptq_damp, self.gptq_act_order, blocksize=128)

    def train(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> None:
        if self.epochs == 0 or not any(True for _ in qblock.quant_parameters()):
            return
        module = BlockLightningModule(qblock, run.ctx, run.index, self.lwc_lr, self.resolved_let_lr, self.weight_decay)
        trainer = L.Trainer(
            max_epochs=self.epochs,
            accelerator="gpu" if run.device.type == "cuda" else "cpu",
            devices=[run.device.index or 0] if run.device.type == "cuda" else 1,
            precision=run.precision,
            logger=run.logger if run.logger is not None else False,
            callbacks=[EpochCheckpoint(run.checkpoint_dir), *run.callbacks],
            enable_checkpointing=False,
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=run.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            default_root_dir=str(run.checkpoint_dir),
        )
        trainer.fit(module, datamodule=data, ckpt_path=run.resume_checkpoint, weights_only=True)


def qblock_has_lwc(qblock: QuantBlock) -> bool:
    return any(True for _ in qblock.lwc_parameters())
