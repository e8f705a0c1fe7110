"""GPTQ: second-order weight quantization, column by column, with lazy batch updates.

Pure functions on tensors. For a linear layer with inputs ``X`` (tokens x in), the layer-wise objective
``||X W^T - X Q^T||^2`` has Hessian ``H = 2 X^T X / n``. Columns are quantized in order (or in order of
decreasing ``diag(H)`` with activation ordering); after each column, the error is spread over the
columns not yet quantized through the inverse Hessian's Cholesky factor (the optimal update of the
remaining weights), applied lazily in blocks of ``blocksize`` columns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from omniq_lightning.quant.spec import WeightFormat
from omniq_lightning.quant.weight import GroupGrid, grid_of, round_to_grid

ColumnQuantizer = Callable[[torch.Tensor, int], torch.Tensor]


def format_column_quantizer(weight: torch.Tensor, fmt: WeightFormat, gamma: torch.Tensor | None = None,
                            beta: torch.Tensor | None = None) -> tuple[ColumnQuantizer, GroupGrid]:
    """Rounds a column onto the static grid of its original group in ``weight`` (``[out, in]``; LWC clipping
    when logits are given); also returns that grid, on which the codes of GPTQ's result are read off exactly."""
    out_f, in_f = weight.shape
    group = fmt.group_size or in_f
    g = grid_of(weight, fmt, gamma, beta)
    S, Z = g.scale.view(out_f, in_f // group), g.zero.view(out_f, in_f // group)

    def quantize(w: torch.Tensor, j: int) -> torch.Tensor:
        col = GroupGrid(S[:, j // group].to(w.dtype), Z[:, j // group].to(w.dtype))
        return round_to_grid(w, col, fmt)

    return quantize, g


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over the rows ``x`` of a layer's inputs: each batch's product in float32
    (a sum over one batch's tokens), accumulated across batches in float64."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        m = x.shape[0]
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        self.H.add_((x.T @ x).double(), alpha=2.0 / self.n)


def check_damp(percdamp: float) -> float:
    if not 0.0 <= percdamp < 1.0:
        raise ValueError(f"GPTQ dampening method.damp={percdamp} is out of range: use a fraction in [0, 1), e.g. 0.01")
    return percdamp


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    quantize_column: ColumnQuantizer,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
) -> torch.Tensor:
    """Quantize ``W`` ([out, in]) given the Hessian ``H`` ([in, in]) of its inputs.

    ``quantize_column(w, j)`` returns column ``w`` (all output rows) rounded onto the grid of the
    *original* column index ``j``; with groups, the grid of ``j``'s group must be fixed in advance
    (static groups), which keeps groups consistent under activation ordering. Returns the quantized
    weight in the original column order (float32, or float64 for float64 input).
    """
    check_damp(percdamp)
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().clone().to(dt)
    H = H.detach().clone().to(torch.float64)
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(cols), range(cols)] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(dt)  # upper factor of H^-1

    Q = torch.zeros_like(W)
    order = perm.tolist()  # original column indices, read once (no device sync per column)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize_column(w, order[i1 + i])
            Q[:, i1 + i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]
