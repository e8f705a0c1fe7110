"""Experiment tracking through Lightning loggers: Weights & Biases, CSV, or none."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOGGERS = ("none", "csv", "wandb")


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def build_logger(settings: dict[str, Any], out_dir: Path, run_name: str, config: dict[str, Any]):
    """A Lightning logger for ``settings`` (the ``logger`` config node), or None for ``logger=none``."""
    kind = settings.get("name", "none")
    if kind not in LOGGERS:
        raise ValueError(f"logger must be one of {LOGGERS}, got {kind!r}")
    if kind == "none":
        return None
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out_dir), name="logs", version="")
    from lightning.pytorch.loggers import WandbLogger

    mode = settings.get("mode", "auto")
    offline = mode == "offline" or (mode == "auto" and not wandb_has_credentials())
    if offline and mode == "auto":
        print(f"W&B: no API key found (WANDB_API_KEY or ~/.netrc): logging offline to {out_dir / 'wandb'}; "
              "upload later with `wandb sync`")
    logger = WandbLogger(
        project=settings.get("project", "omniq-lightning"),
        entity=settings.get("entity"),
        name=run_name,
        save_dir=str(out_dir),
        offline=offline,
        config=config,
    )
    return logger


def log_summary(logger, metrics: dict[str, float], table: list[dict[str, Any]] | None = None) -> None:
    """Final metrics (and a perplexity table) to the logger's summary."""
    if logger is None:
        return
    logger.log_metrics(metrics)
    experiment = getattr(logger, "experiment", None)
    summary = getattr(experiment, "summary", None)
    if summary is not None:
        for k, v in metrics.items():
            summary[k] = v
        if table:
            import wandb

            columns = list(table[0])
            summary["perplexity_table"] = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in table])
    logger.save()
