"""An independent float64 reference of the quantizers and their straight-through gradients.

Written in NumPy from the formulas (not from the library's autograd graph), so that the library's
pure-PyTorch path and the CUDA kernels are both checked against something they do not share code with.
Covers the uniform and power grids, LWC, learned rounding offsets, and both range conventions
("detached"; "released": min/max carry gradient, ties share it equally, the zero point has none).
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


def _absmax_split(d_range, hi, lo):
    """Gradient of ``max(|hi|, |lo|)`` to hi and lo (ties share it, like torch.maximum)."""
    a_hi, a_lo = np.abs(hi), np.abs(lo)
    share_hi = np.where(a_hi > a_lo, 1.0, np.where(a_hi < a_lo, 0.0, 0.5))
    return d_range * share_hi * np.sign(hi), d_range * (1 - share_hi) * np.sign(lo)


def _to_extremes(rows, d_hi_raw, d_lo_raw):
    """Gradient of each row's max and min to the elements holding them (ties share it equally)."""
    at_max = rows == rows.max(1, keepdims=True)
    at_min = rows == rows.min(1, keepdims=True)
    return at_max * d_hi_raw / at_max.sum(1, keepdims=True) + at_min * d_lo_raw / at_min.sum(1, keepdims=True)


def weight_fake_quant(w, bits, group_size, symmetric, gamma=None, beta=None, grad_out=None, offset=None,
                      ranges="detached", grid="uniform", exponent=1.5):
    """Forward and (with ``grad_out``) gradients to w, gamma and beta (and the rounding offset, when given:
    a 5th result) of weight fake-quant with LWC."""
    w = np.asarray(w, dtype=np.float64)
    out_f, in_f = w.shape
    gs = group_size or in_f
    g = w.reshape(-1, gs)
    v = np.zeros_like(g) if offset is None else np.asarray(offset, np.float64).reshape(g.shape)
    lo_raw, hi_raw = g.min(1, keepdims=True), g.max(1, keepdims=True)
    widened = grid == "uniform" and not symmetric
    if widened:  # the range holds 0, so the zero point is a code
        lo_raw, hi_raw = np.minimum(lo_raw, 0.0), np.maximum(hi_raw, 0.0)
    sg = sigmoid(np.asarray(gamma, np.float64).reshape(-1, 1)) if gamma is not None else np.ones_like(hi_raw)
    sb = sigmoid(np.asarray(beta, np.float64).reshape(-1, 1)) if beta is not None else np.ones_like(lo_raw)
    hi, lo = sg * hi_raw, sb * lo_raw
    if grid == "power":
        return _power(w, g, v, lo_raw, hi_raw, sg, sb, lo, hi, bits, symmetric, gamma, beta, grad_out, offset,
                      ranges, exponent)
    scale, zero, clamped, qmin, qmax = _params(lo, hi, bits, symmetric)
    u = g / scale + v
    r = np.round(u)
    t = r + zero
    inside = (t >= qmin) & (t <= qmax)
    q = np.clip(t, qmin, qmax)
    y = ((q - zero) * scale).reshape(w.shape)
    if grad_out is None:
        return y
    dy = np.asarray(grad_out, np.float64).reshape(g.shape)
    grad_w = np.where(inside, dy, 0.0)
    grad_v = np.where(inside, dy * scale, 0.0)
    released = ranges == "released"
    x_over_s = g / scale
    if symmetric:
        d_scale_elem = np.where(inside, dy * (r - x_over_s), dy * q)
        d_lo_elem = np.zeros_like(dy)
    elif released:  # the zero point is rounded without a gradient
        d_scale_elem = np.where(inside, dy * (r - x_over_s), dy * (q - zero))
        d_lo_elem = np.zeros_like(dy)
    else:
        d_scale_elem = np.where(inside, dy * (r - x_over_s), dy * ((q - zero) - lo / scale))
        d_lo_elem = np.where(inside, 0.0, dy)
    d_range = np.where(clamped, 0.0, d_scale_elem.sum(1, keepdims=True) / qmax)
    if symmetric:
        d_hi, d_lo = _absmax_split(d_range, hi, lo)
    else:
        d_hi = d_range
        d_lo = -d_range + d_lo_elem.sum(1, keepdims=True)
    if widened:  # clamp(max=0) / clamp(min=0): the gradient passes only while the bound is on its side of 0
        d_lo_w, d_hi_w = np.where(g.min(1, keepdims=True) <= 0, 1.0, 0.0), np.where(g.max(1, keepdims=True) >= 0, 1.0, 0.0)
    else:
        d_lo_w = d_hi_w = 1.0
    return _finish(w, g, grad_w, grad_v, d_hi, d_lo, sg, sb, hi_raw, lo_raw, gamma, beta, offset, released, y,
                   d_hi_w, d_lo_w)


def _power(w, g, v, lo_raw, hi_raw, sg, sb, lo, hi, bits, symmetric, gamma, beta, grad_out, offset, ranges, p):
    qmax = 2**bits - 1
    if symmetric:
        half_raw, mid = np.maximum(np.abs(hi), np.abs(lo)), np.zeros_like(hi)
    else:
        half_raw, mid = (hi - lo) / 2, (lo + hi) / 2
    half = np.maximum(half_raw, EPS)
    t = (g - mid) / half
    u = (np.sign(t) * np.abs(t) ** (1 / p) + 1) * qmax / 2
    r = np.round(u + v)
    inside = (r >= 0) & (r <= qmax)
    q = np.clip(r, 0, qmax)
    c = 2 * q / qmax - 1
    level = np.sign(c) * np.abs(c) ** p
    y = (mid + half * level).reshape(w.shape)
    if grad_out is None:
        return y
    dy = np.asarray(grad_out, np.float64).reshape(g.shape)
    grad_w = np.where(inside, dy, 0.0)
    grad_v = np.where(inside, dy * half * p * np.abs(c) ** (p - 1) * 2 / qmax, 0.0)
    d_half = np.where(half_raw < EPS, 0.0, (dy * level).sum(1, keepdims=True))  # codes held fixed
    d_mid = dy.sum(1, keepdims=True)
    if symmetric:
        d_hi, d_lo = _absmax_split(d_half, hi, lo)
    else:
        d_hi, d_lo = d_half / 2 + d_mid / 2, -d_half / 2 + d_mid / 2
    return _finish(w, g, grad_w, grad_v, d_hi, d_lo, sg, sb, hi_raw, lo_raw, gamma, beta, offset,
                   ranges == "released", y)


def _finish(w, g, grad_w, grad_v, d_hi, d_lo, sg, sb, hi_raw, lo_raw, gamma, beta, offset, released, y,
            pass_hi=1.0, pass_lo=1.0):
    if released:
        grad_w = grad_w + _to_extremes(g, d_hi * sg * pass_hi, d_lo * sb * pass_lo)
    grad_gamma = (d_hi * sg * (1 - sg) * hi_raw).reshape(-1) if gamma is not None else None
    grad_beta = (d_lo * sb * (1 - sb) * lo_raw).reshape(-1) if beta is not None else None
    result = (y, grad_w.reshape(w.shape), grad_gamma, grad_beta)
    return result if offset is None else (*result, grad_v.reshape(w.shape))


def token_fake_quant(x, bits, symmetric, grad_out=None, ranges="detached"):
    """Forward and (with ``grad_out``) gradient of dynamic per-token fake-quant."""
    x = np.asarray(x, dtype=np.float64)
    rows = x.reshape(-1, x.shape[-1])
    lo, hi = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
    scale, zero, clamped, qmin, qmax = _params(lo, hi, bits, symmetric)
    r = np.round(rows / scale)
    t = r + zero
    q = np.clip(t, qmin, qmax)
    y = ((q - zero) * scale).reshape(x.shape)
    if grad_out is None:
        return y
    inside = (t >= qmin) & (t <= qmax)
    dy = np.asarray(grad_out, np.float64).reshape(rows.shape)
    grad = np.where(inside, dy, 0.0)
    if ranges == "released":
        d_scale_elem = np.where(inside, dy * (r - rows / scale), dy * (q - zero))
        d_range = np.where(clamped, 0.0, d_scale_elem.sum(1, keepdims=True) / qmax)
        d_hi, d_lo = _absmax_split(d_range, hi, lo) if symmetric else (d_range, -d_range)
        grad = grad + _to_extremes(rows, d_hi, d_lo)
    return y, grad.reshape(x.shape)
