"""Vector quantization of a linear's weight (VPTQ): formats, exact bit counts, the stored form and GPTQ-style
column-wise quantization onto Hessian-weighted k-means codebooks.

Pure functions on tensors. Vectors of length ``v`` run along the output dimension of each column: vector
``r`` of column ``j`` is ``W[r*v:(r+1)*v, j]``. A layer has one codebook of ``k`` centroids (plus, optionally,
a residual codebook fitted to what the first leaves, and a codebook of its own for the outlier columns: the
top fraction by the Hessian's diagonal). With normalisation, each input column ``j`` is standardised first
(``(w - mean_j) / std_j``, both stored in 16 bits), so every column shares the codebook on equal terms.

Codebooks start from k-means over all of the layer's (normalised) vectors, each weighted by ``diag(H)`` of
its column. Then columns are quantized one at a time to the nearest centroid (then residual centroid) with
GPTQ's error feedback through the inverse Hessian (VPTQ's "channel-independent second-order optimization",
``quant/gptq.py``). The stored weight is rebuilt by :meth:`VectorQuantizedWeight.dequantize`, which both the
fake-quant model and the export use: they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from omniq_lightning.quant.gptq import gptq_quantize
from omniq_lightning.quant.kmeans import kmeans, nearest
from omniq_lightning.quant.spec import VectorFormat


@dataclass
class Codebook:
    """Centroids ``[k, v]`` (fp16 values held in float32) and the index of every vector ``[rows, cols]``."""

    centroids: torch.Tensor
    indices: torch.Tensor

    def lookup(self) -> torch.Tensor:
        """The ``[rows * v, cols]`` matrix the indices select."""
        rows, cols = self.indices.shape
        v = self.centroids.shape[1]
        return self.centroids[self.indices.long()].permute(0, 2, 1).reshape(rows * v, cols)


@dataclass
class VectorQuantizedWeight:
    """A vector-quantized weight as stored. ``main`` (and ``residual``) cover the columns that are not outliers,
    in increasing order; ``outlier`` covers ``outlier_columns``; ``col_mean``/``col_std`` ``[in]`` undo the
    normalisation (None without it)."""

    main: Codebook
    residual: Codebook | None
    outlier: Codebook | None
    outlier_columns: torch.Tensor  # long [n_out], sorted
    col_mean: torch.Tensor | None
    col_std: torch.Tensor | None
    fmt: VectorFormat
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def main_columns(self) -> torch.Tensor:
        keep = torch.ones(self.in_features, dtype=torch.bool, device=self.main.indices.device)
        keep[self.outlier_columns] = False
        return torch.nonzero(keep).flatten()

    def dequantize(self) -> torch.Tensor:
        """The float32 weight; the fake-quant model's weight, bit for bit."""
        w = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self.main.indices.device)
        m = self.main.lookup()
        if self.residual is not None:
            m = m + self.residual.lookup()
        w[:, self.main_columns()] = m
        if self.outlier is not None:
            w[:, self.outlier_columns] = self.outlier.lookup()
        if self.col_mean is not None:
            w = w * self.col_std[None] + self.col_mean[None]
        return w

    def to(self, device) -> VectorQuantizedWeight:
        def mv(cb):
            return None if cb is None else Codebook(cb.centroids.to(device), cb.indices.to(device))

        return VectorQuantizedWeight(mv(self.main), mv(self.residual), mv(self.outlier), self.outlier_columns.to(device),
                                     None if self.col_mean is None else self.col_mean.to(device),
                                     None if self.col_std is None else self.col_std.to(device), self.fmt,
                                     self.out_features, self.in_features)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.outlier_columns": self.outlier_columns.to(torch.int32)}
        for tag, cb in (("main", self.main), ("residual", self.residual), ("outlier", self.outlier)):
            if cb is not None:
                out[f"{prefix}.{tag}.centroids"] = cb.centroids
                out[f"{prefix}.{tag}.indices"] = cb.indices.to(torch.int32)
        if self.col_mean is not None:
            out[f"{prefix}.col_mean"], out[f"{prefix}.col_std"] = self.col_mean, self.col_std
        return out

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], prefix: str, fmt: VectorFormat) -> VectorQuantizedWeight:
        """The inverse of :meth:`tensors`."""
        def cb(tag):
            key = f"{prefix}.{tag}.centroids"
            return Codebook(t[key].float(), t[f"{prefix}.{tag}.indices"].long()) if key in t else None

        main, outlier = cb("main"), cb("outlier")
        cols = t[f"{prefix}.outlier_columns"].long()
        shape = (main.indices.shape[0] * fmt.vector, main.indices.shape[1] + cols.numel())
        mean = t.get(f"{prefix}.col_mean")
        return cls(main, cb("residual"), outlier, cols, None if mean is None else mean.float(),
                   None if mean is None else t[f"{prefix}.col_std"].float(), fmt, *shape)


# ---- quantization ----------------------------------------------------------------------------------------------------


def fp16_values(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (what is stored), held in float32."""
    return x.to(torch.float16).to(torch.float32)


def column_vectors(w: torch.Tensor, v: int) -> torch.Tensor:
    """``[out, cols]`` -> the vectors ``[out // v * cols, v]`` (row-block major, then column)."""
    out, cols = w.shape
    return w.reshape(out // v, v, cols).permute(0, 2, 1).reshape(-1, v)


KMEANS_POINTS = 65536  # at most this many vectors (a seeded sample) fit a codebook; all are then assigned
KMEANS_INIT_POINTS = 8192  # k-means++ seeds from max(16 k, 8192) of them (all of them in smaller layers)


def fit_codebook(w: torch.Tensor, col_weight: torch.Tensor, v: int, k: int, iters: int, seed: int,
                 max_points: int = KMEANS_POINTS) -> torch.Tensor:
    """k-means centroids ``[k, v]`` (fp16 values) of the vectors of ``w [out, cols]``, each weighted by its
    column's ``col_weight``; a layer with more than ``max_points`` vectors is fitted on a seeded sample."""
    pts = column_vectors(w, v)
    weights = col_weight[None].expand(w.shape[0] // v, -1).reshape(-1)
    if pts.shape[0] > max(max_points, k):
        pick = torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points].to(pts.device)
        pts, weights = pts[pick], weights[pick]
    k_eff = min(k, pts.shape[0])
    c, _ = kmeans(pts, k_eff, iters=iters, seed=seed, weights=weights, init_sample=max(16 * k_eff, KMEANS_INIT_POINTS))
    if k_eff < k:  # fewer vectors than centroids: the rest are never chosen, but the codebook keeps its size
        c = torch.cat([c, c[:1].expand(k - k_eff, -1)])
    return fp16_values(c)


def vq_quantize(W: torch.Tensor, H: torch.Tensor | None, fmt: VectorFormat, damp: float = 0.01,
                blocksize: int = 128, act_order: bool = True, iters: int = 50, seed: int = 0
                ) -> VectorQuantizedWeight:
    """Vector-quantize ``W [out, in]`` given its inputs' Hessian ``H [in, in]`` (None: no calibration tokens
    reached the layer; plain k-means VQ with unit weights, no error feedback)."""
    out_f, in_f = W.shape
    fmt.validate_shape(out_f, in_f)
    W = W.detach().float()
    diag = torch.ones(in_f, device=W.device) if H is None else torch.diag(H).float().clamp(min=0)
    if not bool((diag > 0).any()):
        diag = torch.ones_like(diag)
    if fmt.normalize:
        mean = fp16_values(W.mean(0))
        std = fp16_values(W.std(0, unbiased=False).clamp(min=1e-6))  # 1e-6 stays nonzero in fp16
    else:
        mean = std = None
    U = W if mean is None else (W - mean[None]) / std[None]
    n_out = fmt.outlier_count(in_f)
    outlier_cols = torch.sort(torch.argsort(diag, descending=True)[:n_out]).values
    is_out = torch.zeros(in_f, dtype=torch.bool, device=W.device)
    is_out[outlier_cols] = True
    main_cols = torch.nonzero(~is_out).flatten()

    # codebooks from Hessian-weighted k-means on the layer's own (normalised) vectors
    main_c = fit_codebook(U[:, main_cols], diag[main_cols], fmt.vector, fmt.centroids, iters, seed)
    res_c = None
    if fmt.residual_centroids:
        u_main = U[:, main_cols]
        labels = nearest(column_vectors(u_main, fmt.vector), main_c)[0].reshape(out_f // fmt.vector, -1)
        res_c = fit_codebook(u_main - Codebook(main_c, labels).lookup(), diag[main_cols], fmt.vector,
                             fmt.residual_centroids, iters, seed + 1)
    out_c = None
    if n_out:
        out_c = fit_codebook(U[:, outlier_cols], diag[outlier_cols], fmt.outlier_vector, fmt.outlier_centroids,
                             iters, seed + 2)

    # column-wise assignment with second-order error feedback
    pos = torch.full((in_f,), -1, dtype=torch.long)
    pos[main_cols.cpu()] = torch.arange(len(main_cols))
    pos[outlier_cols.cpu()] = torch.arange(n_out)
    pos_list, out_list = pos.tolist(), is_out.cpu().tolist()
    idx_main = torch.zeros(out_f // fmt.vector, len(main_cols), dtype=torch.long, device=W.device)
    idx_res = torch.zeros_like(idx_main) if res_c is not None else None
    idx_out = torch.zeros(out_f // fmt.outlier_vector if n_out else 0, n_out, dtype=torch.long, device=W.device)

    def quantize_column(w: torch.Tensor, j: int) -> torch.Tensor:
        u = w.float() if mean is None else (w.float() - mean[j]) / std[j]
        if out_list[j]:
            vec = u.reshape(-1, fmt.outlier_vector)
            i, _ = nearest(vec, out_c)
            idx_out[:, pos_list[j]] = i
            q = out_c[i]
        else:
            vec = u.reshape(-1, fmt.vector)
            i, _ = nearest(vec, main_c)
            idx_main[:, pos_list[j]] = i
            q = main_c[i]
            if res_c is not None:
                r, _ = nearest(vec - q, res_c)
                idx_res[:, pos_list[j]] = r
                q = q + res_c[r]
        q = q.reshape(-1)
        return (q if mean is None else q * std[j] + mean[j]).to(w.dtype)

    if H is None:
        for j in range(in_f):
            quantize_column(W[:, j], j)
    else:
        gptq_quantize(W, H, quantize_column, blocksize, damp, act_order)
    return VectorQuantizedWeight(
        Codebook(main_c, idx_main), None if res_c is None else Codebook(res_c, idx_res),
        None if out_c is None else Codebook(out_c, idx_out), outlier_cols, mean, std, fmt, out_f, in_f)
