"""`BlockLightningModule`: one quantized block, trained on its own output error.

The training axes are settings of the same module (:class:`TrainSettings`): the loss, the optimizer,
the learning-rate schedule and whether the best iterate is kept. The trainable tensors are always
``qblock.quant_parameters()``: clipping logits and equivalent-transform factors, plus per-weight rounding
offsets when learned rounding is switched on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from omniq_lightning import distributed
from omniq_lightning.calib.phases import phase
from omniq_lightning.transforms import QuantBlock

LOSSES = ("mse", "mse_channel", "mse_token", "cosine")
OPTIMIZERS = ("adamw", "sgd", "signsgd")
SCHEDULES = ("constant", "linear", "cosine")
GROUPS = ("lwc", "let", "affine", "rounding")


@dataclass(frozen=True)
class TrainSettings:
    """How a block's parameters are trained.

    lrs: learning rate per parameter group ("lwc", "let", "rounding").
    loss: "mse" (block-output MSE, OmniQuant's), "mse_channel" (each hidden channel's squared error divided by
      that channel's mean squared target over the calibration set, so that a few massive channels do not
      dominate), "mse_token" (each token's squared error divided by its target's squared norm), "cosine"
      (1 - cosine similarity per token).
    optimizer: "adamw", "sgd" (no momentum), "signsgd" (p -= lr * sign(grad), as SignRound).
    schedule: "constant", "linear" (to 0 at the last step) or "cosine", per step over ``total_steps``.
    keep_best: evaluate the loss over all calibration batches before training and after every epoch, and
      end with the parameters of the lowest.
    patience: with ``keep_best``, stop training once that loss has not improved for this many epochs (early
      stopping; None: train every epoch).
    """

    lrs: dict[str, float] = field(default_factory=lambda: {"lwc": 1e-2, "let": 5e-3, "rounding": 5e-3})
    weight_decay: float = 0.0
    loss: str = "mse"
    optimizer: str = "adamw"
    schedule: str = "constant"
    total_steps: int = 1
    keep_best: bool = False
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.patience is not None:
            if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
                raise ValueError(f"method.patience must be a positive number of epochs or null, got {self.patience!r}")
            if not self.keep_best:
                raise ValueError("method.patience stops on the calibration loss that keep_best evaluates: set "
                                 "method.keep_best=true (or method.patience=null)")
        for name, allowed in (("loss", LOSSES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"method.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for group, lr in self.lrs.items():
            if group not in GROUPS or not (isinstance(lr, (int, float)) and lr > 0):
                raise ValueError(f"learning rates must be positive numbers for {GROUPS}, got {group}={lr!r}")


def block_loss(out: torch.Tensor, target: torch.Tensor, kind: str, channel_energy: torch.Tensor | None = None):
    """The block-output loss of ``out`` against ``target`` (``[batch, tokens, hidden]``, float32)."""
    if kind == "mse":
        return F.mse_loss(out, target)
    if kind == "mse_channel":
        assert channel_energy is not None, "mse_channel needs the targets' per-channel mean square"
        return ((out - target).pow(2) / channel_energy).mean()
    if kind == "mse_token":
        err = (out - target).pow(2).sum(-1)
        return (err / target.pow(2).sum(-1).clamp(min=1e-12)).mean()
    return (1 - F.cosine_similarity(out, target, dim=-1, eps=1e-12)).mean()


@torch.no_grad()
def channel_energy(targets, eps_fraction: float = 1e-6) -> torch.Tensor:
    """Per hidden channel, the mean square of the targets over every calibration token (float32), floored at
    ``eps_fraction`` of its mean so that a silent channel cannot make the loss blow up."""
    total, count = None, 0
    for i in range(len(targets)):
        t = targets[i].float().reshape(-1, targets[i].shape[-1])
        total = t.pow(2).sum(0) if total is None else total + t.pow(2).sum(0)
        count += t.shape[0]
    distributed.sum_(total)  # every rank's targets (a data-parallel run)
    (count,) = distributed.sum_floats(count)
    energy = total / count
    return energy.clamp(min=eps_fraction * energy.mean().item())


class SignSGD(torch.optim.Optimizer):
    """``p -= lr * sign(grad)`` (plus decoupled weight decay): SignRound's optimizer."""

    def __init__(self, params: Iterable, lr: float = 5e-3, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(p.grad), alpha=-group["lr"])
        return loss


def schedule_factor(kind: str, step: int, total: int) -> float:
    """The learning-rate multiplier at optimizer step ``step`` of ``total``."""
    if kind == "constant" or total <= 0:
        return 1.0
    frac = min(step / total, 1.0)
    return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


class BlockLightningModule(L.LightningModule):
    """Trains exactly ``qblock.quant_parameters()``; everything else is frozen.

    Loss: ``settings.loss`` between the quantized block's output and the full-precision targets (plus, with
    a second target in the batch, the same loss to the fp block's output on the quantized inputs:
    OmniQuant's ``aug_loss``). Checkpoints hold only the trainable tensors.
    """

    def __init__(self, qblock: QuantBlock, ctx, block_index: int, settings: TrainSettings | None = None,
                 energy: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qblock = qblock
        self.ctx = ctx
        self.block_index = block_index
        self.settings = settings or TrainSettings()
        if self.settings.loss == "mse_channel" and energy is None:
            raise ValueError("loss mse_channel needs the targets' per-channel energy (calib.lightning.channel_energy)")
        self.energy = energy
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
        if self.energy is not None:
            self.energy = self.energy.to(self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qblock(x, self.ctx)

    def batch_loss(self, batch) -> torch.Tensor:
        x, targets = batch[0].float(), batch[1:]  # caches may hold fp16; the block computes in float32
        out = self(x).float()
        return sum(block_loss(out, t.float(), self.settings.loss, self.energy) for t in targets)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        if not distributed.all_true(bool(torch.isfinite(loss))):  # every rank stops with the same error
            raise FloatingPointError(
                f"block {self.block_index}: the calibration loss became {loss.item()} at step {self.global_step}. "
                "Remedies: trainer.precision=32 (or bf16-mixed instead of 16-mixed), lower method.lwc_lr / "
                "method.let_lr, or check the block's inputs for overflow"
            )
        self.log(f"block_{self.block_index}/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch[0].shape[0], sync_dist=self.trainer.world_size > 1)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        for wq in self.qblock.weight_quantizers():
            wq.project()  # learned rounding offsets stay in [-0.5, 0.5]

    def configure_optimizers(self):
        params = {
            "lwc": [p for p in self.qblock.lwc_parameters() if p.requires_grad],
            "let": [p for p in self.qblock.let_parameters() if p.requires_grad],
            "affine": [p for p in self.qblock.affine_parameters() if p.requires_grad],
            "rounding": [p for p in self.qblock.rounding_parameters() if p.requires_grad],
        }
        missing = [name for name, ps in params.items() if ps and name not in self.settings.lrs]
        if missing:
            raise ValueError(f"block {self.block_index} has {', '.join(missing)} parameters to train but no learning "
                             f"rate for them (TrainSettings.lrs has {sorted(self.settings.lrs)})")
        groups = [{"params": ps, "lr": self.settings.lrs[name], "name": name} for name, ps in params.items() if ps]
        if not groups:
            raise ValueError(f"block {self.block_index} has nothing to train: enable quant.lwc, method.let or "
                             "method.learn_rounding")
        s = self.settings
        if s.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
        elif s.optimizer == "sgd":
            opt = torch.optim.SGD(groups, weight_decay=s.weight_decay)
        else:
            opt = SignSGD(groups, weight_decay=s.weight_decay)
        if s.schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule_factor(s.schedule, step, s.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


class KeepBest(L.Callback):
    """Keeps the trainable tensors of the lowest full-calibration-set loss, the state before training included;
    ``restore`` loads them back after training. Its state travels in the epoch checkpoints (resumes exactly);
    list it before the checkpoint callback so that an epoch's evaluation is in that epoch's checkpoint."""

    def __init__(self, patience: int | None = None) -> None:
        self.patience = patience
        self.best_loss: float | None = None
        self.best_state: dict[str, torch.Tensor] = {}
        self.history: list[float] = []

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module: BlockLightningModule) -> float:
        total, n = 0.0, 0
        with trainer.precision_plugin.forward_context(), phase("best-iterate evaluation"):
            for batch in trainer.datamodule.train_dataloader():
                batch = [t.to(module.device) for t in batch]
                total += module.batch_loss(batch).item() * batch[0].shape[0]
                n += batch[0].shape[0]
        total, n = distributed.sum_floats(total, n)  # every rank's share: all ranks keep the same iterate
        return total / max(n, 1)

    def consider(self, trainer: L.Trainer, module: BlockLightningModule) -> None:
        loss = self.evaluate(trainer, module)
        self.history.append(loss)
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss = loss
            self.best_state = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def patience_spent(self) -> bool:
        """Whether the loss has not improved for ``patience`` evaluations (the one before training counted)."""
        if self.patience is None or self.best_loss is None:
            return False
        return len(self.history) - 1 - self.history.index(self.best_loss) >= self.patience

    def on_train_start(self, trainer: L.Trainer, module: BlockLightningModule) -> None:
        if self.best_loss is None:  # a resumed fit restored its best from the checkpoint
            self.consider(trainer, module)
        if self.patience_spent():  # a fit resumed after it stopped early: it stays stopped
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: L.Trainer, module: BlockLightningModule) -> None:
        self.consider(trainer, module)
        if self.patience_spent():
            trainer.should_stop = True

    @torch.no_grad()
    def restore(self, module: BlockLightningModule) -> None:
        """Load the best parameters into ``module`` (after ``fit``: also when a fit resumed from a checkpoint of its
        last epoch, where Lightning runs no training and calls no end-of-training hook)."""
        params = dict(module.named_parameters())
        for name, value in self.best_state.items():
            params[name].copy_(value.to(params[name].device))

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_state": self.best_state, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_state = state["best_loss"], state["best_state"]
        self.history = list(state.get("history", []))
