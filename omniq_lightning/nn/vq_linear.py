"""`VQLinear`: an inference linear that keeps its weight vector-quantized (VPTQ's indices and codebooks).

On CUDA with the extension built, inputs of at most ``gemv_max_tokens`` rows (decoding) run the codebook-lookup
GEMV (``cuda_ext/vq.cuh``: the weight is never formed); larger inputs dequantize the weight with the kernel
and run a dense matmul. Elsewhere the torch reference (``VectorQuantizedWeight.dequantize``) rebuilds the
weight. Both dequantizations give the same weight bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omniq_lightning.quant.cuda import load_extension
from omniq_lightning.quant.vq import VectorQuantizedWeight


def kernel_parts(q: VectorQuantizedWeight) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[int]]:
    """The weight's codebook parts as the kernels take them: indices int32 ``[ncols, rows]``, centroids float32,
    the input column of every part column (int64), and whether the part adds to the previous one."""
    main_cols = q.main_columns()
    parts = [(q.main, main_cols, 0), (q.residual, main_cols, 1), (q.outlier, q.outlier_columns, 0)]
    idx, books, cols, acc = [], [], [], []
    for cb, c, a in parts:
        if cb is None or c.numel() == 0:
            continue
        idx.append(cb.indices.T.to(torch.int32).contiguous())
        books.append(cb.centroids.float().contiguous())
        cols.append(c.to(torch.int64).contiguous())
        acc.append(a)
    return idx, books, cols, acc


def dequantize_with_kernel(q: VectorQuantizedWeight) -> torch.Tensor | None:
    """The float32 weight from the CUDA kernel, or None when the extension cannot run (not on CUDA, not built)."""
    ext = load_extension() if q.main.indices.is_cuda else None
    if ext is None:
        return None
    idx, books, cols, acc = kernel_parts(q)
    return ext.vq_dequantize(idx, books, cols, acc, q.col_mean, q.col_std, q.out_features, q.in_features)


def gemv_with_kernel(x: torch.Tensor, q: VectorQuantizedWeight) -> torch.Tensor | None:
    """``x [tokens, in] @ W^T`` by codebook lookup, or None when the extension cannot run."""
    ext = load_extension() if x.is_cuda else None
    if ext is None:
        return None
    idx, books, cols, _ = kernel_parts(q)
    return ext.vq_gemv(x, idx, books, cols, q.col_mean, q.col_std, q.out_features)


class VQLinear(nn.Module):
    def __init__(self, q: VectorQuantizedWeight, bias: torch.Tensor | None = None, gemv_max_tokens: int = 8) -> None:
        super().__init__()
        self.q = q
        self.in_features, self.out_features = q.in_features, q.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.gemv_max_tokens = gemv_max_tokens

    def _apply(self, fn, recurse=True):  # .to(device) moves the codes too
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0))
        if probe.device != self.q.main.indices.device:
            self.q = self.q.to(probe.device)
        return self

    def weight_float(self) -> torch.Tensor:
        w = dequantize_with_kernel(self.q)
        return self.q.dequantize() if w is None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = gemv_with_kernel(flat, self.q) if flat.shape[0] <= self.gemv_max_tokens else None
        if y is None:
            y = F.linear(flat, self.weight_float().to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.q.fmt.name}"
