"""`QuantSpec`: the frozen, validated description of how a model is quantized.

Bits of 16 mean "not quantized" (W16 keeps fp weights, A16 keeps fp activations). Weight groups run
along the input dimension of a linear layer; ``w_group_size=None`` means one range per output channel.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

NO_QUANT_BITS = 16
MIN_BITS, MAX_BITS = 2, 8
A_GRANULARITIES = ("token", "tensor")
# Weight grids: "uniform" (affine integer grid) and "power" (companding: levels mid + half * sign(c)|c|^p for
# c uniform in [-1, 1]; p > 1 puts more levels near the centre of each group's range, where most weights are).
GRIDS = ("uniform", "power")
SCALE_BITS = 16  # a stored scale (or half-range, or midpoint) is one fp16/bf16 number


def check_bits(field: str, bits: int) -> int:
    """Return ``bits`` if it is an allowed bit width (2..8, or 16 for "keep full precision")."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{field} must be an integer in {MIN_BITS}..{MAX_BITS} or {NO_QUANT_BITS}, got {bits!r}")
    if not (MIN_BITS <= bits <= MAX_BITS or bits == NO_QUANT_BITS):
        raise ValueError(
            f"{field}={bits} is out of range: allowed values are {MIN_BITS}..{MAX_BITS}, "
            f"or {NO_QUANT_BITS} to leave that tensor in full precision"
        )
    return bits


def check_group_size(group_size: int | None, in_features: int | None = None) -> int | None:
    """Validate a weight group size; with ``in_features``, also that it divides the input width."""
    if group_size is None or group_size == -1 or group_size == 0:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(
            f"w_group_size must be a positive integer (e.g. 64 or 128) or null for per-channel, got {group_size!r}"
        )
    if in_features is not None and in_features % group_size != 0:
        raise ValueError(
            f"w_group_size={group_size} does not divide the input width {in_features}: choose a group size "
            f"that divides {in_features} (e.g. {largest_divisor_at_most(in_features, group_size)}) or null for "
            "per-channel quantization"
        )
    return group_size


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@dataclass(frozen=True)
class WeightFormat:
    """How one linear layer's weight is stored: bits per weight, grouping, symmetry and grid.

    Attributes:
        bits: 2..8, or 16 for a full-precision weight.
        group_size: group length along the input dimension, or None for one range per output channel.
        symmetric: a grid centred on zero (no zero point / midpoint is stored).
        grid: "uniform" or "power" (see ``GRIDS``).
        grid_exponent: the exponent p of the power grid (ignored for uniform grids).
    """

    kind: ClassVar[str] = "scalar"
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False
    grid: str = "uniform"
    grid_exponent: float = 1.5

    def __post_init__(self) -> None:
        check_bits("w_bits", self.bits)
        object.__setattr__(self, "group_size", check_group_size(self.group_size))
        if self.grid not in GRIDS:
            raise ValueError(f"w_grid must be one of {GRIDS}, got {self.grid!r}")
        if isinstance(self.grid_exponent, bool) or not isinstance(self.grid_exponent, (int, float)) or not (
            1.0 <= self.grid_exponent <= 4.0
        ):
            raise ValueError(f"w_grid_exponent must be a number in [1, 4] (1 = uniform spacing), got {self.grid_exponent!r}")
        object.__setattr__(self, "grid_exponent", float(self.grid_exponent))
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"w_symmetric must be true or false, got {self.symmetric!r}")

    @property
    def quantized(self) -> bool:
        return self.bits != NO_QUANT_BITS

    @property
    def name(self) -> str:
        group = f"g{self.group_size}" if self.group_size else ""
        grid = "" if self.grid == "uniform" else f"-{self.grid}{self.grid_exponent:g}"
        return f"w{self.bits}{group}{'sym' if self.symmetric else ''}{grid}"

    def validate_shape(self, out_features: int, in_features: int) -> None:
        """Refuse a ``[out, in]`` weight this format cannot hold (a group size that does not divide ``in``)."""
        check_group_size(self.group_size, in_features)

    def fits(self, in_features: int) -> bool:
        """Whether a linear of this input width can take the format (its group size divides the width)."""
        return in_features % (self.group_size or in_features) == 0

    def metadata_bits_per_group(self) -> int:
        """Bits stored per group besides the codes: a 16-bit scale, plus for asymmetric grids the zero point
        (``bits`` bits, an integer on the grid) or, for the power grid, a 16-bit midpoint."""
        if not self.quantized:
            return 0
        if self.symmetric:
            return SCALE_BITS
        return SCALE_BITS + (self.bits if self.grid == "uniform" else SCALE_BITS)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits to store a ``[out_features, in_features]`` weight in this format (16 per weight if not quantized)."""
        n = out_features * in_features
        if not self.quantized:
            return NO_QUANT_BITS * n
        groups = out_features * (in_features // (self.group_size or in_features))
        return n * self.bits + groups * self.metadata_bits_per_group()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # no "kind": scalar is what a format without one is (bit plans, block records)


CODEBOOK_BITS = 16  # centroids, normalisation statistics: fp16
COLUMN_INDEX_BITS = 16  # the index of an outlier column (layers up to 65536 inputs)
MAX_CENTROIDS = 2**16


def _check_codebook(what: str, v: int, k: int, allow_zero: bool = False) -> None:
    if allow_zero and k == 0:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 16:
        raise ValueError(f"{what} vector length must be an integer in [1, 16], got {v!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k > MAX_CENTROIDS or k & (k - 1):
        raise ValueError(f"{what} centroids must be a power of two in [2, {MAX_CENTROIDS}] (an index is log2(k) "
                         f"bits){' or 0 for none' if allow_zero else ''}, got {k!r}")


@dataclass(frozen=True)
class VectorFormat:
    """How one linear's weight is vector-quantized.

    Attributes:
        vector: vector length v (along the output dimension).
        centroids: codebook size k (a power of two: an index is log2(k) bits, so log2(k)/v bits per weight).
        residual_centroids: size of a second codebook for the residual (same v), or 0 for none.
        outlier_fraction: the fraction of input columns (top by diag(H)) with a codebook of their own.
        outlier_vector, outlier_centroids: that codebook's v and k.
        normalize: standardise each input column first (mean and std stored in 16 bits).
    """

    kind: ClassVar[str] = "vector"
    vector: int = 4
    centroids: int = 256
    residual_centroids: int = 0
    outlier_fraction: float = 0.0
    outlier_vector: int = 4
    outlier_centroids: int = 256
    normalize: bool = True

    def __post_init__(self) -> None:
        _check_codebook("w_vq", self.vector, self.centroids)
        _check_codebook("w_vq residual", self.vector, self.residual_centroids, allow_zero=True)
        if isinstance(self.outlier_fraction, bool) or not 0.0 <= float(self.outlier_fraction) < 1.0:
            raise ValueError(f"w_vq.outlier_fraction must be in [0, 1), got {self.outlier_fraction!r}")
        object.__setattr__(self, "outlier_fraction", float(self.outlier_fraction))
        if self.outlier_fraction:
            _check_codebook("w_vq outlier", self.outlier_vector, self.outlier_centroids)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"w_vq.normalize must be true or false, got {self.normalize!r}")

    quantized = True

    @property
    def index_bits(self) -> float:
        """Index bits per weight of the main (and residual) codebooks: log2(k)/v (+ log2(k_r)/v)."""
        r = math.log2(self.residual_centroids) if self.residual_centroids else 0
        return (math.log2(self.centroids) + r) / self.vector

    @property
    def name(self) -> str:
        res = f"+r{self.residual_centroids}" if self.residual_centroids else ""
        out = f"+o{self.outlier_fraction:g}v{self.outlier_vector}k{self.outlier_centroids}" if self.outlier_fraction else ""
        return f"vq-v{self.vector}k{self.centroids}{res}{out}{'' if self.normalize else '-nonorm'}"

    def outlier_count(self, in_features: int) -> int:
        return math.ceil(self.outlier_fraction * in_features) if self.outlier_fraction else 0

    def validate_shape(self, out_features: int, in_features: int) -> None:
        vs = [self.vector] + ([self.outlier_vector] if self.outlier_fraction else [])
        bad = [v for v in vs if out_features % v]
        if bad:
            raise ValueError(f"vector length {bad[0]} does not divide the output width {out_features}: choose a "
                             f"w_vq.vector (and outlier_vector) that divides {out_features}")
        if in_features > 2**COLUMN_INDEX_BITS:
            raise ValueError(f"layers wider than {2**COLUMN_INDEX_BITS} inputs are not supported, got {in_features}")
        n_out = self.outlier_count(in_features)
        main = out_features // self.vector * (in_features - n_out)
        books = [("centroids", self.centroids, main), ("residual_centroids", self.residual_centroids, main)]
        if n_out:
            books.append(("outlier_centroids", self.outlier_centroids, out_features // self.outlier_vector * n_out))
        for key, k, vectors in books:
            if k > vectors:
                raise ValueError(f"w_vq.{key}={k} is more than the {vectors} vectors of a {out_features}x{in_features} "
                                 f"linear: a codebook cannot use more centroids than it has vectors to fit; choose "
                                 f"w_vq.{key} <= {1 << (vectors.bit_length() - 1)}")

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Exact bits to store a ``[out, in]`` weight: indices, codebooks, outlier column indices, normalisation."""
        n_out = self.outlier_count(in_features)
        n_main = in_features - n_out
        rows = out_features // self.vector
        bits = rows * n_main * int(math.log2(self.centroids)) + self.vector * self.centroids * CODEBOOK_BITS
        if self.residual_centroids:
            bits += rows * n_main * int(math.log2(self.residual_centroids))
            bits += self.vector * self.residual_centroids * CODEBOOK_BITS
        if n_out:
            bits += (out_features // self.outlier_vector) * n_out * int(math.log2(self.outlier_centroids))
            bits += self.outlier_vector * self.outlier_centroids * CODEBOOK_BITS + n_out * COLUMN_INDEX_BITS
        if self.normalize:
            bits += 2 * in_features * CODEBOOK_BITS
        return bits

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> VectorFormat:
        return cls(**{k: v for k, v in d.items() if k != "kind"})


# Weight format types by kind: the frozen dataclasses a format's ``to_dict()`` round-trips through. A format type
# has a ``kind`` class attribute, ``quantized``, ``name``, ``validate_shape(out, in)``, ``storage_bits(out, in)`` and
# ``to_dict()``; ``nn.formats.register_format_kind`` adds new ones (with their quantizer and stored codes).
FORMAT_TYPES: dict[str, type] = {WeightFormat.kind: WeightFormat, VectorFormat.kind: VectorFormat}


def register_format_type(cls: type) -> type:
    """Make ``cls`` (a format type with a unique ``kind``) readable by :func:`format_from_dict`."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a weight format type needs a 'kind' name, {cls.__name__} has {kind!r}")
    if FORMAT_TYPES.get(kind, cls) is not cls:
        raise ValueError(f"weight format kind {kind!r} is already registered by {FORMAT_TYPES[kind].__name__}")
    FORMAT_TYPES[kind] = cls
    return cls


def format_from_dict(d: Mapping[str, Any]):
    """A weight format from its ``to_dict()`` (a mapping without ``kind`` is a scalar ``WeightFormat``)."""
    data = dict(d)
    kind = data.pop("kind", WeightFormat.kind)
    if kind not in FORMAT_TYPES:
        raise ValueError(f"unknown weight format kind {kind!r}; known kinds: {', '.join(sorted(FORMAT_TYPES))}")
    cls = FORMAT_TYPES[kind]
    fields = getattr(cls, "__dataclass_fields__", {})
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {kind} format setting(s) {unknown}; allowed: {sorted(fields)}")
    return cls(**data)


@dataclass(frozen=True)
class QuantSpec:
    """How weights, activations and the KV cache are quantized.

    Attributes:
        w_bits: weight bits, 2..8, or 16 for full-precision weights.
        w_group_size: group length along the input dimension, or None for per-output-channel ranges.
        w_symmetric: symmetric (zero point fixed at 0) instead of asymmetric (min/max) weight grid.
        w_grid: "uniform" (integer grid) or "power" (non-uniform, see ``GRIDS``).
        w_grid_exponent: the power grid's exponent.
        lwc: learnable weight clipping (OmniQuant LWC) on the weight ranges.
        lwc_init: initial value of the clipping logits (sigmoid(4.0) ~ 0.982 keeps almost the full range).
        a_bits: activation bits (inputs of linear layers and attention matmuls), or 16 for none.
        a_granularity: "token" (dynamic range per token) or "tensor" (one static range).
        a_symmetric: symmetric activation grid.
        lac: learnable activation clipping (FlatQuant's LAC): each per-token input quantizer of a linear clips its
            token ranges to ``[sigmoid(beta) * min, sigmoid(gamma) * max]``, two logits per quantizer.
        lac_init: their initial value (4.0: ratio 0.982; 2.2: QuaRot's fixed ratio 0.9 for methods that do not
            train them).
        kv_bits: bits of the key/value cache, or 16 for none.
        w_vq: vector quantization of the weights (``VectorFormat``, VPTQ) instead of a scalar grid; the other
            ``w_*`` settings and ``lwc`` then do not apply.
        w_format: any registered weight format kind, as a mapping with its ``kind`` (``{kind: vector, ...}`` is
            the same as ``w_vq``); the other ``w_*`` settings then do not apply.
    """

    w_bits: int = 4
    w_group_size: int | None = None
    w_symmetric: bool = False
    w_grid: str = "uniform"
    w_grid_exponent: float = 1.5
    lwc: bool = True
    lwc_init: float = 4.0
    a_bits: int = NO_QUANT_BITS
    a_granularity: str = "token"
    a_symmetric: bool = False
    lac: bool = False
    lac_init: float = 4.0
    kv_bits: int = NO_QUANT_BITS
    w_vq: VectorFormat | None = None
    w_format: Any = None

    def __post_init__(self) -> None:
        if self.w_format is not None and (isinstance(self.w_format, Mapping) or not hasattr(self.w_format, "kind")):
            # a mapping (an OmegaConf node answers attribute access too, so it is tested first) or a format object
            if not isinstance(self.w_format, Mapping) or "kind" not in self.w_format:
                raise ValueError(f"w_format must be a mapping with a 'kind' (one of {sorted(FORMAT_TYPES)}) or null, "
                                 f"got {self.w_format!r}")
            object.__setattr__(self, "w_format", format_from_dict(self.w_format))
        if self.w_format is not None and self.w_vq is not None:
            raise ValueError("set w_vq or w_format, not both (w_vq is w_format with kind: vector)")
        if self.w_vq is not None and not isinstance(self.w_vq, VectorFormat):
            if not isinstance(self.w_vq, Mapping):
                raise ValueError(f"w_vq must be a mapping of vector-quantization settings or null, got {self.w_vq!r}")
            unknown = sorted(set(self.w_vq) - set(VectorFormat.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown w_vq setting(s) {unknown}; allowed: {sorted(VectorFormat.__dataclass_fields__)}")
            object.__setattr__(self, "w_vq", VectorFormat(**dict(self.w_vq)))
        check_bits("a_bits", self.a_bits)
        check_bits("kv_bits", self.kv_bits)
        fmt = WeightFormat(self.w_bits, self.w_group_size, self.w_symmetric, self.w_grid, self.w_grid_exponent)
        object.__setattr__(self, "w_group_size", fmt.group_size)
        object.__setattr__(self, "w_grid_exponent", fmt.grid_exponent)
        if self.a_granularity not in A_GRANULARITIES:
            raise ValueError(f"a_granularity must be one of {A_GRANULARITIES}, got {self.a_granularity!r}")
        for name in ("w_symmetric", "lwc", "a_symmetric", "lac"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def weight_format(self) -> WeightFormat | VectorFormat:
        """The format of every quantized linear's weight (a per-linear plan may override it)."""
        if self.w_format is not None:
            return self.w_format
        if self.w_vq is not None:
            return self.w_vq
        return WeightFormat(self.w_bits, self.w_group_size, self.w_symmetric, self.w_grid, self.w_grid_exponent)

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_format.quantized

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits != NO_QUANT_BITS

    @property
    def quantizes_kv(self) -> bool:
        return self.kv_bits != NO_QUANT_BITS

    @property
    def weight_only(self) -> bool:
        return not self.quantizes_activations and not self.quantizes_kv

    @property
    def name(self) -> str:
        """Short conventional name, e.g. ``w4a16g128``, ``w4a4`` or ``vq2`` (index bits of a vector format)."""
        if self.w_vq is not None or self.w_format is not None:
            acts = f"a{self.a_bits}" if self.quantizes_activations else ""
            kv = f"kv{self.kv_bits}" if self.quantizes_kv else ""
            w = f"vq{self.w_vq.index_bits:g}" if self.w_vq is not None else self.w_format.name
            return f"{w}{acts}{kv}"
        group = f"g{self.w_group_size}" if self.w_group_size else ""
        grid = "" if self.w_grid == "uniform" else f"-{self.w_grid}{self.w_grid_exponent:g}"
        if self.quantizes_kv and not self.quantizes_activations:  # RPTQ's naming: W4A4KV = only K and V at 4 bits
            return f"w{self.w_bits}a{self.kv_bits}kv{group}{grid}"
        kv = f"kv{self.kv_bits}" if self.quantizes_kv and self.kv_bits != self.a_bits else ""
        return f"w{self.w_bits}a{self.a_bits}{group}{kv}{grid}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["w_format"] = None if self.w_format is None else self.w_format.to_dict() | {"kind": self.w_format.kind}
        for key in ("w_vq", "w_format"):
            if d[key] is None:
                d.pop(key)
        return d

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> QuantSpec:
        """Build from a mapping (a Hydra/OmegaConf ``quant`` node); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        data = {k: v for k, v in dict(cfg).items() if k != "name"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quant setting(s) {unknown}; allowed keys are {sorted(known)}")
        return cls(**data)
