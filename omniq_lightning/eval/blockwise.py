"""Perplexity of a model held block by block (a lazily loaded one, :mod:`omniq_lightning.models.lazy`).

The windows' block-0 inputs are captured once; then each block, given by ``block_at(i)`` and dropped after it,
takes every window's hidden states in turn; last, the model's own forward runs with its blocks replaced by a
replay of the final hidden states, so the final norm, head and any family's tail (Gemma's soft-capping) are the
model's. The same protocol as :func:`omniq_lightning.eval.perplexity.perplexity`; peak memory is one block, the
parts outside the blocks, and the windows' hidden states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchmetrics.text import Perplexity

from omniq_lightning.data.windows import eval_windows
from omniq_lightning.eval.perplexity import PerplexityResult


class Replay(nn.Module):
    """Stands for a block in the model's forward: returns ``hidden`` (the final hidden states) when given, else
    its input, wrapped as the real blocks return theirs."""

    def __init__(self, hidden: torch.Tensor | None, wrap: bool) -> None:
        super().__init__()
        self.hidden, self.wrap = hidden, wrap

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.hidden is None else self.hidden
        return (out,) if self.wrap else out


@torch.no_grad()
def blockwise_perplexity(
    model: nn.Module,
    adapter,
    block_at: Callable[[int], nn.Module],
    ids: torch.Tensor,
    seqlen: int,
    *,
    corpus: str = "",
    max_windows: int | None = None,
    device: torch.device | str = "cpu",
) -> PerplexityResult:
    """Perplexity of ``model`` over ``ids`` in windows of ``seqlen``, block ``i`` being ``block_at(i)`` (on
    ``device``; the model's own blocks are not run). The parts outside the blocks must be on ``device``."""
    windows = eval_windows(ids, seqlen, max_windows)
    n = windows.shape[0]
    dtype = next(adapter.blocks(model)[0].parameters()).dtype
    hidden = torch.empty(n, seqlen, adapter.hidden_size(model), dtype=dtype)
    contexts = adapter.capture(model, (windows[j : j + 1] for j in range(n)), hidden, device)
    wrap = False
    for i, ctx in enumerate(contexts):
        block = block_at(i)
        for j in range(n):
            out = block(hidden[j : j + 1].to(device), **ctx.kwargs)
            wrap = isinstance(out, (tuple, list))
            hidden[j] = (out[0] if wrap else out)[0].to(dtype)
        del block
    metric = Perplexity(sync_on_compute=False).to(device)  # one process evaluates (rank 0 of a data-parallel run)
    blocks = adapter.blocks(model)
    originals = list(blocks)
    try:
        for j in range(n):
            for i in range(len(originals)):
                blocks[i] = Replay(hidden[j : j + 1].to(device) if i == 0 else None, wrap)
            batch = windows[j : j + 1].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            metric.update(logits[:, :-1].float(), batch[:, 1:])
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return PerplexityResult(corpus=corpus, perplexity=float(metric.compute()), seqlen=seqlen, windows=n,
                            windows_available=ids.numel() // seqlen, tokens=windows.numel())
