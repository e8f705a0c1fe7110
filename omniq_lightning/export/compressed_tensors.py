"""compressed-tensors checkpoints (transformers with the ``compressed-tensors`` package, vLLM).

* weight-only int4 / int8, symmetric or asymmetric, per group or per channel: ``pack-quantized``, per linear
  ``weight_packed`` (int32 ``[out, ceil(in*b/32)]``), ``weight_scale`` ``[out, groups]``, ``weight_zero_point``
  (asymmetric: int32, packed along the output dimension) and ``weight_shape``; a mixed-precision plan becomes one
  config group per weight format;
* W8A8 with dynamic per-token input activations (what vLLM runs): ``int-quantized``, int8 ``weight`` and
  ``weight_scale`` ``[out, 1]`` (symmetric per-channel weights).

compressed-tensors codes are signed (``q - 2^(b-1)``, zero points likewise); stored, they are shifted back by
``2^(b-1)``: exactly our unsigned codes.

Online transforms (``export.online``) go in ``transform_config``: each distinct input transform of a linear (QuaRot's
R4, a learned affine transform) is one scheme at the ``input`` location of the linears that share it, with its
matrix in the checkpoint once (``<first target>.<scheme>_input.weight``, tied across the targets, as
compressed-tensors' own ``save_pretrained`` writes it): type ``hadamard`` when it is Sylvester's (which the loader
can also rebuild), else ``random-matrix`` (the stored matrix is the transform). The weights hold the inverse
already, so no ``weight_input`` entry is written. A rotation of queries and keys (R3) leaves every ``q.k``
unchanged and these schemes quantize neither, so it is exactly nothing here and is left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from omniq_lightning.export.bits import pack_bits, unpack_bits
from omniq_lightning.export.online import OnlineInput
from omniq_lightning.export.packed import rewrite_checkpoint, serving_limits
from omniq_lightning.export.registry import Exporter, ExportJob, ExportRequest, register_exporter
from omniq_lightning.quant import QuantizedWeight, QuantSpec, WeightFormat

CT_BITS = (4, 8)


def ct_tensors(q: QuantizedWeight, prefix: str, dtype: torch.dtype, w8a8: bool) -> dict[str, torch.Tensor]:
    """A linear's compressed-tensors tensors (see the module docstring)."""
    f = q.fmt
    offset = 2 ** (f.bits - 1)
    if w8a8:
        return {f"{prefix}.weight": (q.codes.to(torch.int16) - offset).to(torch.int8),
                f"{prefix}.weight_scale": q.scale.to(dtype)}
    out = {f"{prefix}.weight_packed": pack_bits(q.codes, f.bits, dim=1), f"{prefix}.weight_scale": q.scale.to(dtype),
           f"{prefix}.weight_shape": torch.tensor(q.shape, dtype=torch.int64)}
    if not f.symmetric:
        out[f"{prefix}.weight_zero_point"] = pack_bits(q.zero.round().to(torch.int64), f.bits, dim=0)
    return out


def ct_scheme(f: WeightFormat, spec: QuantSpec) -> dict:
    weights = {"num_bits": f.bits, "type": "int", "symmetric": f.symmetric, "dynamic": False,
               "strategy": "group" if f.group_size else "channel", "group_size": f.group_size, "actorder": None}
    acts = None
    if spec.quantizes_activations:
        acts = {"num_bits": spec.a_bits, "type": "int", "symmetric": spec.a_symmetric, "dynamic": True,
                "strategy": "token", "group_size": None}
    return {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None,
            "format": "int-quantized" if acts else "pack-quantized"}


def ct_config(quantized: Mapping[str, QuantizedWeight], spec: QuantSpec) -> dict:
    """compressed-tensors' ``quantization_config``: one config group per weight format (targets: its modules)."""
    groups: dict[WeightFormat, list[str]] = {}
    for name, q in quantized.items():
        groups.setdefault(q.fmt, []).append(name)
    config_groups = {}
    for i, (f, names) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].name)):
        scheme = ct_scheme(f, spec)
        if len(groups) > 1:
            scheme["targets"] = [f"re:^{re.escape(n)}$" for n in sorted(names)]
        config_groups[f"group_{i}"] = scheme
    fmt = next(iter(config_groups.values()))["format"]
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ["lm_head"], "kv_cache_scheme": None,
            "sparsity_config": {}, "transform_config": {}, "version": _ct_version()}


def is_sylvester(v: torch.Tensor) -> bool:
    """Whether ``v`` is Sylvester's Hadamard matrix of its (power-of-two) size over ``sqrt(n)`` (to float32 rounding)."""
    n = v.shape[0]
    if n & (n - 1):
        return False
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.allclose(v * math.sqrt(n), h, atol=1e-5, rtol=0)


def ct_transforms(online: Sequence[OnlineInput]) -> tuple[dict, dict[str, torch.Tensor]]:
    """compressed-tensors' ``transform_config`` for the linears' online input transforms, and the tensors that hold
    their matrices (see the module docstring)."""
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for t in online:
        same = next((g for g in groups if g[0].shape == t.matrix.shape and torch.equal(g[0], t.matrix)), None)
        if same is None:
            groups.append((t.matrix, [t.module]))
        else:
            same[1].append(t.module)
    config, tensors = {}, {}
    for i, (v, modules) in enumerate(groups):
        name = f"omniq_input_{i}"
        hadamard = is_sylvester(v)
        config[name] = {"type": "hadamard" if hadamard else "random-matrix",
                        "apply": [{"targets": [f"re:^{re.escape(m)}$" for m in modules], "location": "input",
                                   "inverse": False, "ignore": []}],
                        "randomize": False, "requires_grad": False, "head_dim": None, "precision": "torch.float32"}
        # the hadamard transform divides by sqrt(n) online; a matrix transform applies its matrix as it is
        stored = (v * math.sqrt(v.shape[0])).round() if hadamard else v
        tensors[f"{modules[0]}.{name}_input.weight"] = stored.float().contiguous()
    return ({"config_groups": config} if config else {}), tensors


def _ct_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # noqa: BLE001 - the format does not need the package to be written
        return "0.20.0"


class CompressedTensorsExporter(Exporter):
    name = "compressed-tensors"
    kinds = ("scalar",)
    online_kinds = frozenset({"input_rotation", "input_affine", "qk_rotation"})

    def why_not(self, req: ExportRequest) -> str | None:
        spec, formats = req.spec, {f for f in req.formats if f.quantized}
        reason = serving_limits(req)
        if reason:
            return reason
        if spec.quantizes_activations:
            w8a8 = (spec.a_bits == 8 and spec.a_granularity == "token" and
                    all(f.bits == 8 and f.symmetric and f.group_size is None for f in formats))
            if not w8a8:
                return ("its weight-activation scheme is W8A8: 8-bit symmetric per-channel weights with dynamic "
                        "per-token 8-bit activations (quant.w_symmetric=true, per-channel)")
        elif any(f.bits not in CT_BITS for f in formats):
            return f"it packs {CT_BITS} bits (what vLLM and transformers run)"
        return None

    def write(self, job: ExportJob) -> Path:
        w8a8 = job.spec.quantizes_activations
        config = ct_config(job.codes, job.spec)
        config["transform_config"], transforms = ct_transforms(job.online_inputs)
        return rewrite_checkpoint(job, lambda name, q: ct_tensors(q, name, job.dtype, w8a8), config,
                                  extra_tensors=transforms)


register_exporter(CompressedTensorsExporter())


def dequantize_ct(tensors: Mapping[str, torch.Tensor], prefix: str, group_size: int | None, bits: int) -> torch.Tensor:
    """The float weight a compressed-tensors pack-quantized linear holds: ``(q - zp) * scale`` per group."""
    out_f, in_f = (int(x) for x in tensors[f"{prefix}.weight_shape"])
    q = unpack_bits(tensors[f"{prefix}.weight_packed"], bits, in_f, dim=1) - 2 ** (bits - 1)
    scale = tensors[f"{prefix}.weight_scale"].float()
    zp_key = f"{prefix}.weight_zero_point"
    zp = (unpack_bits(tensors[zp_key], bits, out_f, dim=0) - 2 ** (bits - 1)) if zp_key in tensors else 0
    g = group_size or in_f
    w = (q.reshape(out_f, in_f // g, g) - (zp if isinstance(zp, int) else zp[..., None])) * scale[..., None]
    return w.reshape(out_f, in_f)


