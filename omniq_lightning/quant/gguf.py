"""llama.cpp's GGUF weight types as exact grids: fake quantization, codes, dequantization, and the bytes of a block.

Every type here stores blocks along a row (the input dimension). Inside a block, groups of ``group`` weights share
one grid ``x_hat = a * (q - z) + b`` with unsigned codes ``q`` in ``0..2^bits - 1``:

* ``Q8_0``, ``Q5_0``, ``Q4_0`` (blocks of 32): ``a = d`` (fp16), ``z = 2^(bits-1)``, ``b = 0``. ``d`` maps the
  weight of largest magnitude onto ``-z`` (Q8_0: ``d = max|x| / 127``), as llama.cpp's reference quantizer does;
* ``Q4_1``, ``Q5_1`` (blocks of 32): ``a = d`` and ``b = m``, both fp16, ``z = 0``: ``d = (max - min) / qmax``,
  ``m = min``;
* ``Q5_K``, ``Q4_K`` (super-blocks of 256, 8 groups of 32) and ``Q2_K`` (16 groups of 16): ``a = d * sc``,
  ``b = -dmin * mn`` with fp16 ``d``, ``dmin`` per super-block and 6-bit (``Q2_K``: 4-bit) ``sc``, ``mn`` per group;
  the group's range is widened to hold 0 on its low side;
* ``Q6_K`` and ``Q3_K`` (super-blocks of 256, 16 groups of 16): ``a = d * sc``, ``z = 32`` (``Q3_K``: 4), fp16 ``d``
  and signed 8-bit (``Q3_K``: 6-bit) ``sc``.

A row width a K-type's 256 does not divide takes llama.cpp's fallback: ``Q6_K -> Q8_0``, ``Q5_K -> Q5_1``,
``Q4_K -> Q5_0``, ``Q3_K`` and ``Q2_K -> Q4_0`` (llama.cpp builds from before 2026 used ``IQ4_NL`` for these two,
a non-uniform grid not calibrated here), a 32-block type -> F16.

The arithmetic of :func:`dequantize` is llama.cpp's (``(d * sc) * (q - z)``, ``(d * sc) * q - dmin * mn`` in
float32), so a file's weights are what calibration saw. Grids come from each group's (LWC-clipped) range; the
stored scales are rounded (to fp16, and for K-types to their 6 or 8 bits) with straight-through gradients, so
learned clipping trains on the grid the file will hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from omniq_lightning.quant.functional import lwc_bounds, round_ste, row_ranges
from omniq_lightning.quant.spec import NO_QUANT_BITS, WeightFormat

F16_MAX = 65504.0


@dataclass(frozen=True)
class GGUFType:
    """One llama.cpp quantization type: ``block`` weights per stored block, ``group`` weights per grid, ``bits`` per
    code, the integer zero ``zero`` (None: an offset ``b`` instead), the sub-scale codes (``sub_bits``, signed or
    not; 0: the block's scale is the grid's), bytes per block, and llama.cpp's type for rows it does not divide."""

    name: str
    block: int
    group: int
    bits: int
    zero: int | None
    sub_bits: int
    sub_signed: bool
    block_bytes: int
    fallback: str  # llama.cpp's type for a row width the block does not divide ("F16": not quantized)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def groups_per_block(self) -> int:
        return self.block // self.group

    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block


GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("Q8_0", 32, 32, 8, 128, 0, False, 34, "F16"),
    GGUFType("Q5_0", 32, 32, 5, 16, 0, False, 22, "F16"),
    GGUFType("Q4_0", 32, 32, 4, 8, 0, False, 18, "F16"),
    GGUFType("Q5_1", 32, 32, 5, None, 0, False, 24, "F16"),
    GGUFType("Q4_1", 32, 32, 4, None, 0, False, 20, "F16"),
    GGUFType("Q6_K", 256, 16, 6, 32, 8, True, 210, "Q8_0"),
    GGUFType("Q5_K", 256, 32, 5, None, 6, False, 176, "Q5_1"),
    GGUFType("Q4_K", 256, 32, 4, None, 6, False, 144, "Q5_0"),
    GGUFType("Q3_K", 256, 16, 3, 4, 6, True, 110, "Q4_0"),
    GGUFType("Q2_K", 256, 16, 2, None, 4, False, 84, "Q4_0"),
)}


def gguf_type(name: str) -> GGUFType:
    if name not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF weight type {name!r}; the types calibrated here are {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[name]


def type_for_width(name: str, in_features: int) -> str:
    """The type a row of ``in_features`` weights is stored in: ``name``, else llama.cpp's fallback chain (the
    ``fallback`` of each type, down to F16) for a width its block does not divide."""
    while name != "F16" and in_features % gguf_type(name).block:
        name = gguf_type(name).fallback
    return name


@dataclass
class GGUFGrid:
    """Per group ``[n_groups, 1]``: the grid's step ``a`` and offset ``b`` (float32, from the stored numbers), and
    what is stored: ``d`` (and ``m``: Q4_1's min, a K-type's ``dmin``) per block, ``sc`` (and ``mn``) per group."""

    a: torch.Tensor
    b: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    sc: torch.Tensor | None
    mn: torch.Tensor | None


def _to_f16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16 (values, float32), straight-through."""
    r = x.detach().clamp(-F16_MAX, F16_MAX).to(torch.float16).to(x.dtype)
    return r + (x - x.detach())


def _safe_div(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, x / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(x))


def _signed_extreme(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The end of ``[lo, hi]`` of larger magnitude, with its sign (llama.cpp's ``max`` of Q4_0)."""
    return torch.where(hi.abs() >= lo.abs(), hi, lo)


def gguf_grid(gx: torch.Tensor, t: GGUFType, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
              ranges: str = "detached") -> GGUFGrid:
    """The grid of each group (row of ``gx``, ``[n_groups, group]``, groups of one row of the weight in order, so
    every ``groups_per_block`` consecutive rows are one block), LWC-clipped by per-group logits."""
    gx = gx.float()
    lo, hi = row_ranges(gx, ranges)
    if t.zero is None and t.sub_bits:  # K-types store a non-negative min: the low end is at most 0
        lo = torch.clamp(lo, max=0.0)
    n = gx.shape[0]
    lo, hi = lwc_bounds(lo, hi, None if gamma is None else gamma.reshape(n, 1).float(),
                        None if beta is None else beta.reshape(n, 1).float())
    if t.sub_bits == 0:
        if t.zero is None:  # Q4_1
            d, m = _to_f16((hi - lo) / t.qmax), _to_f16(lo)
            return GGUFGrid(d, m, d, m, None, None)
        raw = torch.maximum(hi.abs(), lo.abs()) / 127 if t.name == "Q8_0" else _signed_extreme(lo, hi) / -t.zero
        d = _to_f16(raw)
        return GGUFGrid(d, torch.zeros_like(d), d, None, None, None)
    per = t.groups_per_block
    smax = 2 ** (t.sub_bits - 1) if t.sub_signed else 2**t.sub_bits - 1
    if t.zero is None:  # Q5_K, Q4_K, Q2_K: a = d * sc, b = -dmin * mn
        s, mneg = (hi - lo) / t.qmax, -lo
        d = _to_f16(s.reshape(-1, per).amax(1, keepdim=True) / smax)
        dmin = _to_f16(mneg.reshape(-1, per).amax(1, keepdim=True) / smax)
        sc = _round_codes(_safe_div(s.reshape(-1, per), d), 0, smax)
        mn = _round_codes(_safe_div(mneg.reshape(-1, per), dmin), 0, smax)
        a = (d * sc).reshape(n, 1)
        return GGUFGrid(a, -(dmin * mn).reshape(n, 1), d, dmin, sc.reshape(n, 1), mn.reshape(n, 1))
    s = (_signed_extreme(lo, hi) / -t.zero).reshape(-1, per)  # Q6_K, Q3_K: signed group scales
    big = torch.gather(s, 1, s.detach().abs().argmax(1, keepdim=True))
    d = _to_f16(big / -smax)
    sc = _round_codes(_safe_div(s, d), -smax, smax - 1)
    return GGUFGrid((d * sc).reshape(n, 1), torch.zeros(n, 1, device=gx.device), d, None, sc.reshape(n, 1), None)


def _round_codes(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.clamp(round_ste(x), lo, hi)


def _codes(gx: torch.Tensor, g: GGUFGrid, t: GGUFType) -> torch.Tensor:
    """Codes (float, ``0..qmax``) of ``gx`` on grid ``g`` (a zero step gives the zero code)."""
    z = float(t.zero or 0)
    return torch.clamp(torch.round(_safe_div(gx - g.b, g.a)) + z, 0, t.qmax)


def _decode(q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: GGUFType) -> torch.Tensor:
    """llama.cpp's arithmetic: ``a * (q - z)`` for types with an integer zero, ``a * q + b`` for the others."""
    return a * (q - t.zero) if t.zero is not None else a * q + b


def gguf_fake_quant(w: torch.Tensor, t: GGUFType, gamma: torch.Tensor | None = None,
                    beta: torch.Tensor | None = None, ranges: str = "detached") -> torch.Tensor:
    """Fake-quantize a ``[out, in]`` weight on type ``t``'s grid: straight-through to ``w``, differentiable in the
    clipping logits (one per group, ``[out, in / group]``)."""
    gx = w.reshape(-1, t.group).float()
    g = gguf_grid(gx, t, gamma, beta, ranges)
    q = torch.clamp(round_ste(_safe_div(gx - g.b, g.a)) + float(t.zero or 0), 0, t.qmax)
    out = _decode(q, g.a, g.b, t)
    return out.reshape(w.shape).to(w.dtype)


@dataclass
class GGUFCodes:
    """A weight in a GGUF type as stored: codes ``[out, in]`` (uint8, ``0..qmax``), ``d`` (fp16, per block),
    ``m`` (fp16 per block: Q4_1's min, a K-type's dmin), ``sc`` / ``mn`` (int16 per group: a K-type's sub-scales
    and sub-mins)."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    sc: torch.Tensor | None
    mn: torch.Tensor | None
    fmt: object  # the GGUFFormat (``fmt.type``)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def gtype(self) -> GGUFType:
        return gguf_type(self.fmt.type)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group ``[n_groups, 1]``: step ``a`` and offset ``b`` in float32, from the stored numbers."""
        t = self.gtype
        per = t.groups_per_block
        d = self.d.float().reshape(-1, 1)
        if t.sub_bits == 0:
            b = self.m.float().reshape(-1, 1) if self.m is not None else torch.zeros_like(d)
            return d, b
        sc = self.sc.float().reshape(-1, per)
        a = (d * sc).reshape(-1, 1)
        if self.mn is None:
            return a, torch.zeros_like(a)
        return a, (-(self.m.float().reshape(-1, 1) * self.mn.float().reshape(-1, per))).reshape(-1, 1)

    def dequantize(self) -> torch.Tensor:
        t = self.gtype
        a, b = self.grid()
        q = self.codes.reshape(-1, t.group).float()
        return _decode(q, a, b, t).reshape(self.codes.shape)

    def to(self, device) -> GGUFCodes:
        return self.map(lambda x: x.to(device))

    def map(self, f) -> GGUFCodes:
        """The codes with ``f`` applied to every stored tensor (e.g. a device move, or a reordering of the rows)."""
        opt = [None if x is None else f(x) for x in (self.m, self.sc, self.mn)]
        return GGUFCodes(f(self.codes), f(self.d), *opt, self.fmt)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        parts = {"codes": self.codes, "d": self.d, "m": self.m, "sc": self.sc, "mn": self.mn}
        return {f"{prefix}.{k}": v for k, v in parts.items() if v is not None}

    @classmethod
    def from_tensors(cls, tensors, prefix: str, fmt) -> GGUFCodes:
        parts = [tensors[f"{prefix}.{k}"] if f"{prefix}.{k}" in tensors else None for k in ("m", "sc", "mn")]
        return cls(tensors[f"{prefix}.codes"], tensors[f"{prefix}.d"], *parts, fmt)


@torch.no_grad()
def gguf_quantize(w: torch.Tensor, fmt, gamma: torch.Tensor | None = None,
                  beta: torch.Tensor | None = None) -> GGUFCodes:
    """The codes and stored scales of what :func:`gguf_fake_quant` computes (``dequantize()`` equals it)."""
    t = gguf_type(fmt.type)
    gx = w.reshape(-1, t.group).float()
    g = gguf_grid(gx, t, gamma, beta)
    return stored(_codes(gx, g, t).reshape(w.shape), g, fmt)


def stored(q: torch.Tensor, g: GGUFGrid, fmt) -> GGUFCodes:
    """Codes ``q`` (``[out, in]``, float) on grid ``g`` as they are stored."""
    out = q.shape[0]

    def per_row(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if x is None else x.detach().reshape(out, -1).to(dtype)

    return GGUFCodes(q.to(torch.uint8), per_row(g.d, torch.float16), per_row(g.m, torch.float16),
                     per_row(g.sc, torch.int16), per_row(g.mn, torch.int16), fmt)


@torch.no_grad()
def gguf_column_quantizer(w: torch.Tensor, t: GGUFType, gamma: torch.Tensor | None = None,
                          beta: torch.Tensor | None = None):
    """GPTQ's column rounding on the static grid of each group of ``w`` (``[out, in]``): returns
    ``(quantize_column(col, j), grid)``."""
    out, width = w.shape
    g = gguf_grid(w.reshape(-1, t.group).float(), t, gamma, beta)
    a, b = g.a.reshape(out, width // t.group), g.b.reshape(out, width // t.group)
    z = float(t.zero or 0)

    def quantize(col: torch.Tensor, j: int) -> torch.Tensor:
        aj, bj = a[:, j // t.group].to(col.dtype), b[:, j // t.group].to(col.dtype)
        q = torch.clamp(torch.round(_safe_div(col - bj, aj)) + z, 0, t.qmax)
        return _decode(q, aj, bj, t)

    return quantize, g


def gguf_codes_on(w_hat: torch.Tensor, g: GGUFGrid, fmt) -> GGUFCodes:
    """The stored codes of a weight already on grid ``g`` (GPTQ's result): exact, and checked to be."""
    t = gguf_type(fmt.type)
    c = stored(_codes(w_hat.reshape(-1, t.group).float(), g, t).reshape(w_hat.shape), g, fmt)
    if not torch.equal(c.dequantize(), w_hat.float()):
        raise ValueError("the weight is not on the given GGUF grid: its codes cannot be recovered exactly")
    return c


# ---- llama.cpp's named mixes: the type of each tensor of a file type (llama-quant.cpp, dense models) ------------

# the file type's base type: the type of every linear no rule below moves
GGUF_MIXES: dict[str, str] = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
                              "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K"}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mix_type(mix: str, role: str, layer: int, n_layers: int, n_gqa: int, seventy_b: bool = False) -> str:
    """The type llama.cpp's quantizer gives one linear of a dense model in file type ``mix``: ``role`` is its GGUF
    tensor name in the block (``attn_v``, ``ffn_down``, ``attn_output``, ...), ``n_gqa`` query heads per key head,
    ``seventy_b`` whether llama.cpp calls the model a 70B (an 80-layer LLaMA with GQA, an 80-layer Qwen2). (The
    width fallback, :func:`type_for_width`, comes after.)"""
    base = gguf_mix_base(mix)
    if role == "attn_v":
        new = base
        if mix == "Q2_K":
            new = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif mix == "Q3_K_M":
            new = "Q5_K" if layer < 2 else "Q4_K"
        elif mix == "Q3_K_L":
            new = "Q5_K"
        elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            new = "Q6_K"
        elif mix == "Q4_K_S" and layer < 4:
            new = "Q5_K"
        return "Q5_K" if seventy_b and new in ("Q3_K", "Q4_K") else new
    if role == "ffn_down":
        if mix == "Q2_K":
            return "Q3_K"
        if mix == "Q3_K_M":
            return "Q5_K" if layer < n_layers // 16 else "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
        if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            return "Q6_K"
        if mix == "Q4_K_S" and layer < n_layers // 8:
            return "Q5_K"
    if role == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, base)
    if role == "attn_qkv":  # a fused query/key/value projection (Phi-3)
        return {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(mix, base)
    return base


def gguf_mix_base(mix: str) -> str:
    if mix not in GGUF_MIXES:
        raise ValueError(f"unknown GGUF mix {mix!r}; llama.cpp's mixes calibrated here are {', '.join(GGUF_MIXES)} "
                         f"(a single type for every linear: quant.w_format.type, one of {', '.join(GGUF_TYPES)})")
    return GGUF_MIXES[mix]


@dataclass(frozen=True)
class GGUFFormat:
    """A linear's weight in one of llama.cpp's GGUF types (``type``, see ``GGUF_TYPES``), calibrated on its exact
    grid. A row width the type's block does not divide takes llama.cpp's fallback type (:meth:`for_shape`).

    With ``mix`` (one of llama.cpp's file types, ``GGUF_MIXES``: ``Q4_K_M``, ``Q3_K_M``, ...), ``type`` is the
    mix's base type and each linear's own type is the one llama.cpp's quantizer picks for it (:func:`mix_type`,
    applied before the block loop by :class:`~omniq_lightning.passes.gguf_mix.GGUFMixPass`)."""

    kind: ClassVar[str] = "gguf"
    quantized: ClassVar[bool] = True
    type: str | None = None
    mix: str | None = None

    def __post_init__(self) -> None:
        if self.mix is not None:
            base = gguf_mix_base(self.mix)
            if self.type not in (None, base):
                raise ValueError(f"GGUF mix {self.mix} has base type {base}, not {self.type}: leave "
                                 "quant.w_format.type out (null) with a mix")
            object.__setattr__(self, "type", base)
        elif self.type is None:
            object.__setattr__(self, "type", "Q4_K")
        gguf_type(self.type)

    @property
    def name(self) -> str:  # a mix and a type may share a name (Q2_K): a mix's says so
        return f"gguf-mix-{self.mix}" if self.mix else f"gguf-{self.type}"

    def model_passes(self) -> list:
        """The pass that gives each linear its type in a mix (none for a single type)."""
        if self.mix is None:
            return []
        from omniq_lightning.passes.gguf_mix import GGUFMixPass

        return [GGUFMixPass(self.mix)]

    def validate_shape(self, out_features: int, in_features: int) -> None:
        t = gguf_type(self.type)
        if in_features % t.block:
            fits = [n for n, u in GGUF_TYPES.items() if in_features % u.block == 0]
            raise ValueError(f"GGUF {self.type} stores blocks of {t.block} weights, which do not divide the input "
                             f"width {in_features}; types that fit: {', '.join(fits) or 'none (F16)'} (llama.cpp's "
                             f"own fallback for {self.type} is {type_for_width(self.type, in_features)})")

    def fits(self, in_features: int) -> bool:
        """Whether this type's block divides a row of ``in_features`` (a mixed plan only offers such types)."""
        return in_features % gguf_type(self.type).block == 0

    def for_shape(self, out_features: int, in_features: int):
        """The format a ``[out, in]`` weight takes: this type, or llama.cpp's fallback (a 16-bit weight for F16)."""
        name = type_for_width(self.type, in_features)
        if name == "F16":
            return WeightFormat(bits=NO_QUANT_BITS)
        return self if name == self.type else GGUFFormat(name)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        t = gguf_type(self.type)
        return out_features * (in_features // t.block) * t.block_bytes * 8

    def to_dict(self) -> dict:
        return {"kind": self.kind, "type": self.type} | ({"mix": self.mix} if self.mix else {})


# ---- the bytes of a row, as llama.cpp lays out each type's block ---------------------------------------------------


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0xF) | ((hi & 0xF) << 4)


def _bit_planes(bits: np.ndarray, n: int) -> np.ndarray:
    """The low bit of each of the last axis' ``n`` entries, packed little-endian into one integer (bit ``i`` from
    entry ``i``)."""
    return ((bits & 1).astype(np.uint32) << np.arange(n, dtype=np.uint32)).sum(-1, dtype=np.uint32)[..., None]


def pack_rows(c: GGUFCodes) -> np.ndarray:
    """``[out, n_blocks * block_bytes]`` uint8: the rows of ``c`` in llama.cpp's block layout (what GGUF stores)."""
    t = c.gtype
    q = c.codes.cpu().numpy().astype(np.uint8)
    out, width = q.shape
    nb = width // t.block
    q = q.reshape(out, nb, t.block)
    d = c.d.cpu().numpy().astype("<f2").reshape(out, nb, 1).view(np.uint8)  # [out, nb, 2]
    m = None if c.m is None else c.m.cpu().numpy().astype("<f2").reshape(out, nb, 1).view(np.uint8)
    if t.block == 32:  # Q8_0, Q5_0, Q5_1, Q4_0, Q4_1: d, [m], [qh], codes
        parts = [d] if m is None else [d, m]
        if t.name == "Q8_0":
            parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        else:
            if t.bits == 5:
                parts.append(_bit_planes(q >> 4, 32).astype("<u4").view(np.uint8))
            parts.append(_nibbles(q[..., :16], q[..., 16:]))
        return np.concatenate(parts, axis=-1).reshape(out, -1)
    if t.name in ("Q5_K", "Q4_K"):
        sc = c.sc.cpu().numpy().astype(np.uint8).reshape(out, nb, 8)
        mn = c.mn.cpu().numpy().astype(np.uint8).reshape(out, nb, 8)
        scales = np.zeros((out, nb, 12), np.uint8)
        scales[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
        scales[..., 4:8] = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
        scales[..., 8:12] = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
        chunks = q.reshape(out, nb, 4, 64)
        qs = _nibbles(chunks[..., :32], chunks[..., 32:]).reshape(out, nb, 128)
        if t.name == "Q4_K":
            return np.concatenate([d, m, scales, qs], axis=-1).reshape(out, -1)
        # qh[l] holds bit 4 of element 32 * j + l in its bit j
        qh = _bit_planes(np.moveaxis(q.reshape(out, nb, 8, 32) >> 4, -2, -1), 8).astype(np.uint8).reshape(out, nb, 32)
        return np.concatenate([d, m, scales, qh, qs], axis=-1).reshape(out, -1)
    if t.name in ("Q3_K", "Q2_K"):
        # two bits of element 128 * h + 32 * k + l in bits 2k of byte 32 * h + l
        crumbs = (q & 3).reshape(out, nb, 2, 4, 32)
        qs = sum(crumbs[..., k, :] << (2 * k) for k in range(4)).astype(np.uint8).reshape(out, nb, 64)
        if t.name == "Q2_K":
            sc = c.sc.cpu().numpy().astype(np.uint8).reshape(out, nb, 16)
            mn = c.mn.cpu().numpy().astype(np.uint8).reshape(out, nb, 16)
            return np.concatenate([sc | (mn << 4), qs, d, m], axis=-1).reshape(out, -1)
        hmask = _bit_planes(np.moveaxis(q.reshape(out, nb, 8, 32) >> 2, -2, -1), 8).astype(np.uint8).reshape(out, nb, 32)
        s6 = (c.sc.cpu().numpy().astype(np.int16) + 32).astype(np.uint8).reshape(out, nb, 16)  # stored with +32
        scales = np.zeros((out, nb, 12), np.uint8)
        scales[..., 0:8] = (s6[..., :8] & 0xF) | ((s6[..., 8:] & 0xF) << 4)
        scales[..., 8:12] = sum(((s6[..., 4 * k:4 * k + 4] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)
        return np.concatenate([hmask, qs, scales, d], axis=-1).reshape(out, -1)
    if t.name == "Q6_K":
        halves = q.reshape(out, nb, 2, 4, 32)  # [half, quarter, l]: element 128 * half + 32 * quarter + l
        ql = np.concatenate([_nibbles(halves[..., 0, :], halves[..., 2, :]),
                             _nibbles(halves[..., 1, :], halves[..., 3, :])], axis=-1).reshape(out, nb, 128)
        qh = sum(((halves[..., k, :] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8).reshape(out, nb, 64)
        sc = c.sc.cpu().numpy().astype(np.int8).reshape(out, nb, 16).view(np.uint8)
        return np.concatenate([ql, qh, sc, d], axis=-1).reshape(out, -1)
    raise ValueError(f"no block layout for GGUF type {t.name}")
