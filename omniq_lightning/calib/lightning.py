"""`BlockLightningModule`: one quantized block, trained on its own output error."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from omniq_lightning.transforms import QuantBlock


class BlockLightningModule(L.LightningModule):
    """Trains exactly ``qblock.quant_parameters()`` (LWC logits, LET factors); everything else is frozen.

    Loss: MSE between the quantized block's output and the full-precision targets (plus, with a
    second target in the batch, the MSE to the fp block's output on the quantized inputs:
    OmniQuant's ``aug_loss``). Checkpoints hold only the trainable tensors.
    """

    def __init__(self, qblock: QuantBlock, ctx, block_index: int, lwc_lr: float, let_lr: float,
                 weight_decay: float = 0.0) -> None:
        super().__init__()
        self.qblock = qblock
        self.ctx = ctx
        self.block_index = block_index
        self.lwc_lr, self.let_lr, self.weight_decay = lwc_lr, let_lr, weight_decay
        self.strict_loading = False  # checkpoints carry the trainable tensors only
        for p in self.qblock.parameters():
            p.requires_grad_(False)
        for p in self.qblock.quant_parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> BlockLightningModule:
        """Always evaluation mode: calibration must not switch on the model's dropout."""
        return super().train(False)

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_fit_start(self) -> None:
        self.ctx = self.ctx.to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qblock(x, self.ctx)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, targets = batch[0].float(), batch[1:]  # caches may hold fp16; the block computes in float32
        out = self(x).float()
        loss = sum(F.mse_loss(out, t.float()) for t in targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"block {self.block_index}: the calibration loss became {loss.item()} at step {self.global_step}. "
                "Remedies: trainer.precision=32 (or bf16-mixed instead of 16-mixed), lower method.lwc_lr / "
                "method.let_lr, or check the block's inputs for overflow"
            )
        self.log(f"block_{self.block_index}/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=x.shape[0])
        return loss

    def configure_optimizers(self):
        groups = []
        lwc = [p for p in self.qblock.lwc_parameters() if p.requires_grad]
        let = [p for p in self.qblock.let_parameters() if p.requires_grad]
        if lwc:
            groups.append({"params": lwc, "lr": self.lwc_lr, "name": "lwc"})
        if let:
            groups.append({"params": let, "lr": self.let_lr, "name": "let"})
        if not groups:
            raise ValueError(f"block {self.block_index} has nothing to train: enable quant.lwc or method.let")
        return torch.optim.AdamW(groups, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
