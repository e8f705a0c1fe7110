"""`BlockRun`: what a method needs to know about the block it is calibrating and the run around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class BlockRun:
    index: int
    n_blocks: int
    ctx: Any  # BlockContext of the model (attention mask, positions)
    device: torch.device
    precision: str  # Lightning precision: "32-true", "bf16-mixed", "16-mixed"
    checkpoint_dir: Path
    resume_checkpoint: Path | None
    logger: Any = None  # a Lightning logger, or None
    progress_bar: bool = True
    callbacks: list[Any] = field(default_factory=list)  # extra Lightning callbacks (timers, profilers)
