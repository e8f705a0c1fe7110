"""Perplexity by the GPTQ/OmniQuant protocol: non-overlapping windows, mean NLL, exp."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchmetrics.text import Perplexity

from omniq_lightning.data.windows import eval_windows


@dataclass(frozen=True)
class PerplexityResult:
    corpus: str
    perplexity: float
    seqlen: int
    windows: int
    windows_available: int
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    *,
    corpus: str = "",
    max_windows: int | None = None,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
) -> PerplexityResult:
    """Perplexity of ``model`` over the 1-D token ids ``ids`` in windows of ``seqlen``.

    Every window predicts its ``seqlen - 1`` next tokens; the result is exp of the mean NLL over all
    predicted tokens (equal to the mean over windows of each window's mean, as windows are equal).
    ``max_windows`` caps the number of windows for quick runs; the count used is always reported.
    """
    windows = eval_windows(ids, seqlen, max_windows)
    available = ids.numel() // seqlen
    metric = Perplexity(sync_on_compute=False).to(device)  # one process evaluates (rank 0 of a data-parallel run)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        metric.update(logits[:, :-1].float(), batch[:, 1:])
    return PerplexityResult(
        corpus=corpus,
        perplexity=float(metric.compute()),
        seqlen=seqlen,
        windows=windows.shape[0],
        windows_available=available,
        tokens=windows.numel(),
    )
