"""Training one block's quantization parameters with Lightning: one ``Trainer.fit`` of a ``BlockLightningModule``
over a ``BlockDataModule``, with epoch checkpoints (atomic, resumable), optionally keeping the best iterate.

Lightning's messages that say nothing to a user of this library (the accelerator banner, a tip to install
a logging service, the end of ``fit``, warnings about modules kept in evaluation mode on purpose or about
data-loader workers for data that is already in memory) are silenced here, once per block; ours stay.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from omniq_lightning import distributed
from omniq_lightning.calib.checkpoint import AtomicCheckpointIO, EpochCheckpoint
from omniq_lightning.calib.datamodule import BlockDataModule
from omniq_lightning.calib.lightning import BlockLightningModule, KeepBest, TrainSettings, channel_energy
from omniq_lightning.calib.phases import phase
from omniq_lightning.calib.run import BlockRun
from omniq_lightning.nn import LETRouter

_LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                           "lightning_utilities.core.rank_zero", "lightning.pytorch.accelerators.cuda")
_QUIET_WARNINGS = (r".*module\(s\) in eval mode.*", r".*isinstance\(treespec, LeafSpec\).*",
                   r".*does not have many workers.*", r".*set_float32_matmul_precision.*")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """While active, Lightning's informational lines and the warnings listed above are not shown."""
    loggers = [logging.getLogger(n) for n in _LIGHTNING_INFO_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def placement(run: BlockRun, qblock) -> dict:
    """Where Lightning trains: the run's device; in a data-parallel run, Lightning's DDP over the ranks torchrun
    started (their process group already joined; each rank's batches are its own share of every global batch, so
    no sampler is added, and gradients are averaged over the ranks). In an MoE block an expert may get no token
    of one rank's share: DDP is told to look for such unused parameters there."""
    accelerator = "gpu" if run.device.type == "cuda" else "cpu"
    w = distributed.world()
    if w.size == 1:
        return {"accelerator": accelerator, "devices": [run.device.index or 0] if run.device.type == "cuda" else 1}
    routed = any(isinstance(m, LETRouter) for m in qblock.modules())
    strategy = DDPStrategy(process_group_backend="nccl" if run.device.type == "cuda" else "gloo",
                           find_unused_parameters=routed)
    return {"accelerator": accelerator, "devices": w.local_size, "num_nodes": w.nodes, "strategy": strategy,
            "use_distributed_sampler": False}


def fit_block(qblock, data: BlockDataModule, run: BlockRun, settings: TrainSettings, epochs: int) -> dict[str, float]:
    """Train ``qblock.quant_parameters()`` for ``epochs`` epochs on the block-output loss; resumes from
    ``run.resume_checkpoint``. Returns the calibration losses (start, best, best epoch) when the best iterate is
    kept. The block is left on ``run.device``."""
    energy = channel_energy(data.targets) if settings.loss == "mse_channel" else None
    module = BlockLightningModule(qblock, run.ctx, run.index, settings, energy)
    best = KeepBest(settings.patience) if settings.keep_best else None
    with quiet_lightning(), phase("training"):
        trainer = L.Trainer(
            max_epochs=epochs,
            **placement(run, qblock),
            precision=run.precision,
            logger=run.logger if run.logger is not None else False,
            callbacks=[*([best] if best else []), EpochCheckpoint(run.checkpoint_dir), *run.callbacks],
            enable_checkpointing=False,
            plugins=[AtomicCheckpointIO()],
            enable_progress_bar=run.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            default_root_dir=str(run.checkpoint_dir),
        )
        trainer.fit(module, datamodule=data, ckpt_path=run.resume_checkpoint, weights_only=True)
    if best is not None:
        best.restore(module)
    # Lightning's teardown moved the module to the CPU; what runs next (GPTQ rounding, folding, the next block's
    # inputs) runs on the run's device, beside the cached activations.
    qblock.to(run.device)
    if best is None or not best.history:
        return {}
    return {"loss_start": best.history[0], "loss_best": best.best_loss,
            "best_epoch": float(best.history.index(best.best_loss)), "epochs_trained": float(len(best.history) - 1)}
