"""Seeded, weighted k-means on tensors (CPU or GPU): RPTQ's channel clustering and VPTQ's codebooks.

k-means++ initialisation from a seeded generator, then Lloyd iterations; distances are computed in
batches of points (``batch``), so layers with millions of vectors fit in memory. Points may carry
weights (VPTQ weights each vector by the Hessian diagonal of its column): the assignment step is
unweighted, the update step is the weighted mean. An empty cluster is re-seeded with the point that is
currently worst served. Deterministic for a given seed and device.
"""

from __future__ import annotations

import torch


def nearest(points: torch.Tensor, centroids: torch.Tensor, batch: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest centroid of every point, and its squared distance (batched over points)."""
    labels = torch.empty(points.shape[0], dtype=torch.long, device=points.device)
    dist = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    c_sq = centroids.pow(2).sum(1)
    for i in range(0, points.shape[0], batch):
        p = points[i : i + batch]
        d = torch.addmm(c_sq[None], p, centroids.T, alpha=-2)  # |c|^2 - 2 p.c: the |p|^2 term does not move the argmin
        m, labels[i : i + batch] = d.min(1)
        dist[i : i + batch] = m + p.pow(2).sum(1)
    return labels, dist.clamp(min=0)


def kmeans_plus_plus(points: torch.Tensor, k: int, gen: torch.Generator, weights: torch.Tensor | None = None,
                     batch: int = 65536) -> torch.Tensor:
    """k-means++ seeding: each new centroid drawn with probability proportional to (weight x) squared distance."""
    n = points.shape[0]
    w = torch.ones(n, dtype=points.dtype, device=points.device) if weights is None else weights.to(points.dtype)
    first = torch.multinomial(w.cpu().double() / w.sum().item(), 1, generator=gen).item()
    centroids = points[first : first + 1].clone()
    best = nearest(points, centroids, batch)[1]
    for _ in range(1, k):
        p = (best * w).cpu().double()
        idx = torch.multinomial(p / p.sum(), 1, generator=gen).item() if p.sum() > 0 else int(
            torch.randint(n, (1,), generator=gen))
        centroids = torch.cat([centroids, points[idx : idx + 1]])
        best = torch.minimum(best, nearest(points, centroids[-1:], batch)[1])
    return centroids


def kmeans(points: torch.Tensor, k: int, iters: int = 50, seed: int = 0, weights: torch.Tensor | None = None,
           batch: int = 65536, tol: float = 1e-6, init_sample: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` centroids ``[k, d]`` of ``points [n, d]`` (optionally weighted) and every point's label ``[n]``.
    ``init_sample``: seed k-means++ from that many points drawn without replacement (seeded) instead of all of
    them (k-means++ is k sequential passes, the cost that dominates on large layers)."""
    if points.dim() != 2:
        raise ValueError(f"k-means takes points of shape [n, d], got {tuple(points.shape)}")
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= the number of points ({n}), got k={k}")
    x = points.float() if points.dtype != torch.float64 else points
    w = None if weights is None else weights.to(x.dtype).clamp(min=0)
    gen = torch.Generator().manual_seed(seed)
    if init_sample is not None and n > max(init_sample, k):
        pick = torch.randperm(n, generator=gen)[:init_sample].to(x.device)
        centroids = kmeans_plus_plus(x[pick], k, gen, None if w is None else w[pick], batch)
    else:
        centroids = kmeans_plus_plus(x, k, gen, w, batch)
    labels, dist = nearest(x, centroids, batch)
    prev = float("inf")
    for _ in range(iters):
        ww = torch.ones(n, dtype=x.dtype, device=x.device) if w is None else w
        sums = torch.zeros_like(centroids).index_add_(0, labels, x * ww[:, None])
        mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, ww)
        empty = mass <= 0
        centroids = torch.where(empty[:, None], centroids, sums / mass.clamp(min=1e-30)[:, None])
        for c in torch.nonzero(empty).flatten().tolist():  # re-seed an empty cluster at the worst-served point
            far = int(torch.argmax(dist * (ww if w is not None else 1)))
            centroids[c] = x[far]
            dist[far] = 0
        labels, dist = nearest(x, centroids, batch)
        inertia = float((dist * (w if w is not None else 1)).sum())
        if prev - inertia <= tol * max(abs(prev), 1e-30):
            break
        prev = inertia
    return centroids.to(points.dtype), labels
