"""Dense little-endian bit packing (pure functions), shared by the packed formats."""

from __future__ import annotations

import math

import torch


def pack_bits(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned integers (``0 <= v < 2^bits``) along ``dim`` into int32 words: a dense little-endian
    bitstream (value i at bits ``[i*b, (i+1)*b)``), ``ceil(n*b/32)`` words per row."""
    v = values.movedim(dim, -1).to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    n = v.shape[-1]
    words = math.ceil(n * bits / 32)
    out = torch.zeros(*v.shape[:-1], words + 1, dtype=torch.int64, device=v.device)
    pos = torch.arange(n, device=v.device) * bits
    word, shift = pos // 32, pos % 32
    low = (v << shift) & 0xFFFFFFFF  # what lands in the value's first word
    out.scatter_add_(-1, word.expand_as(v), low)
    spill = shift + bits > 32  # the rest of a value that straddles a word boundary
    if spill.any():
        high = v >> (32 - shift).clamp(max=32)
        out.scatter_add_(-1, (word + 1).expand_as(v), torch.where(spill, high, torch.zeros_like(high)))
    out = out[..., :words]
    out = torch.where(out >= 2**31, out - 2**32, out)  # two's complement int32
    return out.to(torch.int32).movedim(-1, dim)


def unpack_bits(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``n`` unsigned values per row (int64)."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)
    pos = torch.arange(n, device=w.device) * bits
    word, shift = pos // 32, pos % 32
    lo = torch.gather(w, -1, word.expand(*w.shape[:-1], n)) >> shift
    hi = torch.gather(w, -1, (word + 1).expand(*w.shape[:-1], n)) << (32 - shift)
    v = (lo | torch.where(shift + bits > 32, hi, torch.zeros_like(hi))) & (2**bits - 1)
    return v.movedim(-1, dim)


