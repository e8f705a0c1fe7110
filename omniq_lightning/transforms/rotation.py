"""Orthogonal rotations for weight-activation quantization (QuaRot, SpinQuant): Hadamard constructions, the fast
transform, and the modules that apply a rotation online.

An orthogonal ``M`` spreads a few outlier channels of an activation over all of them, so per-token ranges lose
little; ``W x = (W M^T)(M x)``, so the rotation folds into a weight wherever it meets a linear, and runs online
(``OnlineRotation`` in a ``QuantLinear`` or ``QuantMatMul`` input-transform slot) where it cannot.

Sizes: ``n = m * 2^k`` with ``H_n = H_m (x) H_{2^k}`` (Kronecker), ``H_{2^k}`` Sylvester's, ``H_m`` a Hadamard
matrix of order ``m`` from Paley's constructions (``m = q + 1``, q prime = 3 mod 4; ``m = 2(q + 1)``, q prime =
1 mod 4: 12, 20, 24, 28, 36, 44, ...). SmolLM2's 576 = 36 x 16 and 1536 = 12 x 128 are true Hadamard sizes; a
size with no such factor (stories260K's 172 = 43 x 4) takes a seeded random orthogonal ``m x m`` matrix in place
of ``H_m`` (QuaRot's fallback). Online, the rotation runs as three small matmuls (``H_p = H_p1 (x) H_p2`` and the
small factor, each along its own axis of the row viewed as ``[m, p1, p2]``), which BLAS runs well.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn


def is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` over GF(q) (q prime), chi the quadratic character."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if x in squares else -1.0 for x in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``m`` from Paley's first (``m - 1`` prime = 3 mod 4) or second (``m / 2 - 1``
    prime = 1 mod 4) construction, entries +-1, float64; None when neither applies."""
    q = m - 1
    if is_prime(q) and q % 4 == 3:
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0] = 1.0, -1.0
        s[1:, 1:] = _jacobsthal(q)
        return s + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if m % 2 == 0 and is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0] = 1.0, 1.0
        c[1:, 1:] = _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def random_orthogonal(m: int, seed: int) -> torch.Tensor:
    """A seeded random orthogonal ``m x m`` matrix (QR of a Gaussian, signs fixed), float64."""
    g = torch.randn(m, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


# sizes up to this rotate online by one dense matmul, larger ones by three small matmuls (CPU, one thread, float32:
# dense is faster up to 576 wide, the factors from 768 up: 1536 wide, 3.3 ms against 20.5 ms for 512 tokens and
# 0.04 ms against 0.42 ms for one)
DENSE_MAX = 640
MAX_SMALL = 256  # the small factor runs as an m x m matmul online: m * n operations per token


@lru_cache(maxsize=64)
def factor(n: int) -> tuple[int, int, bool]:
    """``n = m * p`` with ``p`` a power of two and ``m`` the smallest factor, up to ``MAX_SMALL``, of which a Paley
    Hadamard matrix exists: ``(m, p, hadamard)``; without one, ``m`` is the odd part of ``n`` and takes a random
    orthogonal matrix (``hadamard`` False)."""
    if n < 1:
        raise ValueError(f"a rotation needs a positive size, got {n}")
    p = n & -n  # the largest power of two dividing n
    m = n // p
    if m == 1:
        return 1, p, True
    while m <= MAX_SMALL:  # move powers of two into m until a Hadamard order appears (while m stays small)
        if paley(m) is not None:
            return m, p, True
        if p == 1:
            break
        m, p = m * 2, p // 2
    return n // (n & -n), n & -n, False


def small_factor(n: int, seed: int = 0) -> torch.Tensor:
    """The orthonormal ``m x m`` factor of the size-``n`` rotation (float64)."""
    m, _, hadamard = factor(n)
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if hadamard:
        return paley(m) / math.sqrt(m)
    return random_orthogonal(m, seed)


def hadamard_matrix(n: int, seed: int = 0) -> torch.Tensor:
    """The dense orthonormal rotation of size ``n`` (``small_factor (x) H_p / sqrt(p)``), float64."""
    m, p, _ = factor(n)
    return torch.kron(small_factor(n, seed), sylvester(p) / math.sqrt(p))


def random_signs(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.float64) * 2 - 1


def split_power(p: int) -> tuple[int, int]:
    """``p = p1 * p2`` (powers of two, ``p1 <= p2``, as even as possible): ``H_p = H_p1 (x) H_p2`` (Sylvester)."""
    k = p.bit_length() - 1
    return 1 << (k // 2), 1 << (k - k // 2)


def rotate(x: torch.Tensor, small: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor,
           signs: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (diag(signs) (small (x) h1 (x) h2))`` along the last dimension without forming the product: ``x``
    viewed as ``[..., m, p1, p2]`` and multiplied by each factor along its own axis (three small matmuls:
    ``m * p * (m + p1 + p2)`` operations per row instead of ``(m p)^2``)."""
    if signs is not None:
        x = x * signs.to(x.dtype)
    m, p1, p2 = small.shape[0], h1.shape[0], h2.shape[0]
    y = x.reshape(*x.shape[:-1], m, p1, p2) @ h2.to(x.dtype)  # along p2
    y = (y.transpose(-1, -2) @ h1.to(x.dtype)).transpose(-1, -2)  # along p1
    if m > 1:  # along m
        y = (y.reshape(*x.shape[:-1], m, p1 * p2).transpose(-1, -2) @ small.to(x.dtype)).transpose(-1, -2)
    return y.reshape(x.shape)


class OnlineRotation(nn.Module):
    """``x -> x M^T`` for the size-``n`` rotation ``M^T = diag(signs) (small (x) H_p / sqrt(p))`` (signs optional),
    applied fast in the input's dtype (float32 arithmetic for half-precision inputs). Its factors are buffers, so
    a saved block or export reproduces it exactly."""

    def __init__(self, n: int, seed: int = 0, signed: bool = False) -> None:
        super().__init__()
        self.n = n
        _, self.p, _ = factor(n)
        p1, p2 = split_power(self.p)
        # not saved with a state dict: rebuilt from (n, seed, signed), which the run records
        self.register_buffer("small", small_factor(n, seed).float(), persistent=False)
        self.register_buffer("h1", (sylvester(p1) / math.sqrt(p1)).float(), persistent=False)
        self.register_buffer("h2", (sylvester(p2) / math.sqrt(p2)).float(), persistent=False)
        self.register_buffer("signs", random_signs(n, seed + 1).float() if signed else torch.ones(n), persistent=False)
        dense = self.product().float() if n <= DENSE_MAX else torch.empty(0)
        self.register_buffer("dense", dense, persistent=False)

    def product(self) -> torch.Tensor:
        """``diag(signs) (small (x) h1 (x) h2)`` in float64, from the (float32) factors."""
        kron = torch.kron(self.small.double(), torch.kron(self.h1.double(), self.h2.double()))
        return torch.diag(self.signs.double()) @ kron

    def matrix(self) -> torch.Tensor:
        """``M^T`` as a dense float64 matrix: what ``forward`` multiplies by on the right, exactly (so a weight that
        folds the inverse and the online half agree to rounding)."""
        return self.dense.double() if self.dense.numel() else self.product()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        y = x @ self.dense.to(x.dtype) if self.dense.numel() else rotate(x, self.small, self.h1, self.h2, self.signs)
        return y.to(dtype)

    def extra_repr(self) -> str:
        m = self.small.shape[0]
        return f"n={self.n} ({'hadamard' if factor(self.n)[2] else 'orthogonal'} {m} x hadamard {self.p})"


class HeadRotation(nn.Module):
    """R3 (QuaRot): the same rotation on every query and key head after the rotary embedding, online in a
    ``QuantMatMul``'s input-transform slot: ``(M q) . (M k) = q . k``, and the key cache is stored rotated."""

    def __init__(self, head_dim: int, seed: int = 0) -> None:
        super().__init__()
        self.rotation = OnlineRotation(head_dim, seed)

    def forward(self, query, key, value):
        return self.rotation(query), self.rotation(key), value


def rotate_output_online(module: nn.Module, rotation: OnlineRotation) -> None:
    """Rotate ``module``'s output online (a forward hook; its parameters and their names stay as they are): how a
    norm between a block's output projection and the residual stream (Gemma's sandwich norms) passes the residual
    rotation on, where it cannot fold."""
    if getattr(module, "output_rotation", None) is not None:
        raise ValueError(f"{type(module).__name__} already rotates its output")
    module.output_rotation = rotation
    module.register_forward_hook(lambda _m, _args, out: rotation(out))
