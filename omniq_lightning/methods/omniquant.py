"""OmniQuant: learnable weight clipping (LWC) and learnable equivalent transformation (LET), trained
block by block with AdamW to match the full-precision block's outputs; one ``Trainer.fit`` per block."""

from __future__ import annotations

import lightning as L

from omniq_lightning.calib import AtomicCheckpointIO, BlockDataModule, BlockLightningModule, BlockRun, EpochCheckpoint
from omniq_lightning.methods.base import BlockPlan, Method
from omniq_lightning.quant import QuantSpec
from omniq_lightning.transforms import QuantBlock

LET_CHOICES = ("auto", True, False)


class OmniQuant(Method):
    name = "omniquant"
    needs_training_data = True

    def __init__(self, epochs: int = 20, lwc_lr: float = 1e-2, let_lr: float = 5e-3, weight_decay: float = 0.0,
                 let: str | bool = "auto", let_alpha: float = 0.5, aug_loss: bool = False) -> None:
        if let not in LET_CHOICES:
            raise ValueError(f"method.let must be one of auto, true, false; got {let!r}")
        if epochs < 0:
            raise ValueError(f"method.epochs must be 0 or more, got {epochs}")
        if lwc_lr <= 0 or let_lr <= 0:
            raise ValueError(f"method.lwc_lr and method.let_lr must be positive, got {lwc_lr} and {let_lr}")
        if not 0.0 <= let_alpha <= 1.0:
            raise ValueError(f"method.let_alpha must be in [0, 1], got {let_alpha}")
        self.epochs, self.lwc_lr, self.let_lr, self.weight_decay = epochs, lwc_lr, let_lr, weight_decay
        self.let, self.let_alpha, self.aug_loss = let, let_alpha, aug_loss

    @property
    def needs_stats(self) -> bool:  # type: ignore[override]
        return self.let is not False

    def plan(self, spec: QuantSpec, let_default_weight_only: bool) -> BlockPlan:
        let = self.let
        if let == "auto":
            let = (not spec.weight_only) or let_default_weight_only
        return BlockPlan(spec, let=bool(let), let_alpha=self.let_alpha)

    def calibrate(self, qblock: QuantBlock, data: BlockDataModule, run: BlockRun) -> None:
        if self.epochs == 0 or not any(True for _ in qblock.quant_parameters()):
            return
        module = BlockLightningModule(qblock, run.ctx, run.index, self.lwc_lr, self.let_lr, self.weight_decay)
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
