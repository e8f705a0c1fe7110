"""An independent float64 reference of the quantizers and their straight-through gradients.

Written in NumPy from the formulas (not from the library's autograd graph), so that the library's
pure-PyTorch path and the CUDA kernels are both checked against something they do not share code with.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-5


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _grid(bits, symmetric):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _params(lo, hi, bits, symmetric):
    qmin, qmax = _grid(bits, symmetric)
    if symmetric:
        raw = np.maximum(np.abs(hi), np.abs(lo)) / qmax
        scale = np.maximum(raw, EPS)
        zero = np.zeros_like(scale)
    else:
        raw = (hi - lo) / qmax
        scale = np.maximum(raw, EPS)
        zero = np.round(-lo / scale)  # NumPy rounds half to even, like torch.round
    return scale, zero, raw < EPS, qmin, qmax


def weight_fake_quant(w, bits, group_size, symmetric, gamma=None, beta=None, grad_out=None):
    """Forward and (with ``grad_out``) gradients to w, gamma and beta of LWC weight fake-quant."""
    w = np.asarray(w, dtype=np.float64)
    out_f, in_f = w.shape
    gs = group_size or in_f
    g = w.reshape(-1, gs)
    lo_raw, hi_raw = g.min(1, keepdims=True), g.max(1, keepdims=True)
    sg = sigmoid(np.asarray(gamma, np.float64).reshape(-1, 1)) if gamma is not None else np.ones_like(hi_raw)
    sb = sigmoid(np.asarray(beta, np.float64).reshape(-1, 1)) if beta is not None else np.ones_like(lo_raw)
    hi, lo = sg * hi_raw, sb * lo_raw
    scale, zero, clamped, qmin, qmax = _params(lo, hi, bits, symmetric)
    u = g / scale
    r = np.round(u)
    t = r + zero
    inside = (t >= qmin) & (t <= qmax)
    q = np.clip(t, qmin, qmax)
    y = ((q - zero) * scale).reshape(w.shape)
    if grad_out is None:
        return y
    dy = np.asarray(grad_out, np.float64).reshape(g.shape)
    grad_w = np.where(inside, dy, 0.0).reshape(w.shape)
    if symmetric:
        d_scale_elem = np.where(inside, dy * (r - u), dy * q)
        d_lo_elem = np.zeros_like(dy)
    else:
        d_scale_elem = np.where(inside, dy * (r - u), dy * ((q - zero) - lo / scale))
        d_lo_elem = np.where(inside, 0.0, dy)
    d_range = np.where(clamped, 0.0, d_scale_elem.sum(1, keepdims=True) / qmax)
    if symmetric:
        a_hi, a_lo = np.abs(hi), np.abs(lo)
        share_hi = np.where(a_hi > a_lo, 1.0, np.where(a_hi < a_lo, 0.0, 0.5))
        d_hi = d_range * share_hi * np.sign(hi)
        d_lo = d_range * (1 - share_hi) * np.sign(lo)
    else:
        d_hi = d_range
        d_lo = -d_range + d_lo_elem.sum(1, keepdims=True)
    grad_gamma = (d_hi * sg * (1 - sg) * hi_raw).reshape(-1) if gamma is not None else None
    grad_beta = (d_lo * sb * (1 - sb) * lo_raw).reshape(-1) if beta is not None else None
    return y, grad_w, grad_gamma, grad_beta


def token_fake_quant(x, bits, symmetric, grad_out=None):
    """Forward and (with ``grad_out``) straight-through gradient of dynamic per-token fake-quant."""
    x = np.asarray(x, dtype=np.float64)
    rows = x.reshape(-1, x.shape[-1])
    lo, hi = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
    scale, zero, _, qmin, qmax = _params(lo, hi, bits, symmetric)
    t = np.round(rows / scale) + zero
    y = ((np.clip(t, qmin, qmax) - zero) * scale).reshape(x.shape)
    if grad_out is None:
        return y
    inside = (t >= qmin) & (t <= qmax)
    return y, np.where(inside, np.asarray(grad_out, np.float64).reshape(rows.shape), 0.0).reshape(x.shape)
