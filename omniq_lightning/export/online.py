"""The transforms a quantized model runs online, beside its weights: what an exporter must hold besides the codes.

Folded transforms (LET, R1, R2, a learned transform between v and o) are in the weights already. What stays
online is one of these kinds:

* ``input_rotation``: a fixed rotation of a linear's input (QuaRot's R4 before the down projections);
* ``input_affine``: a learned affine transform of a linear's input (FlatQuant-style, Kronecker-factored);
* ``qk_rotation``: a rotation of every query and key head after the rotary embedding (R3): every ``q.k`` product
  is unchanged, so it matters only where queries or keys are quantized;
* ``norm_output_rotation``: the residual rotation applied after a norm that sits between an output projection and
  the residual stream (Gemma's sandwich norms).

A linear's online input transform is linear, so it is one dense matrix ``V`` with ``t(x) = x V``:
:func:`online_inputs` reads it off the model by transforming the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from omniq_lightning.transforms.rotation import HeadRotation, OnlineRotation

ONLINE_KINDS = {
    "input_rotation": "a rotation before the down projections (R4)",
    "input_affine": "learned affine transforms of linear inputs (method.affine)",
    "qk_rotation": "a rotation of queries and keys (R3)",
    "norm_output_rotation": "a rotation after each sandwich norm (R1 on a model with norms after its output projections)",
}


@dataclass(frozen=True)
class OnlineInput:
    """A linear whose input is transformed online: ``x -> x @ matrix`` (float64) before its weight."""

    module: str
    kind: str
    matrix: torch.Tensor


def input_kind(transform: nn.Module) -> str:
    return "input_rotation" if isinstance(transform, OnlineRotation) else "input_affine"


@torch.no_grad()
def transform_matrix(transform: nn.Module, n: int) -> torch.Tensor:
    """The dense ``V`` of a linear transform of the last dimension (``t(x) = x V``), in float64."""
    eye = torch.eye(n, dtype=torch.float32, device=next(transform.buffers(), torch.empty(0)).device)
    return transform(eye).double().cpu()


def online_inputs(model: nn.Module) -> list[OnlineInput]:
    """Every linear of ``model`` with an online input transform (a quantized linear's slot, or an
    ``OnlineInputLinear``), with its dense matrix."""
    out = []
    for name, m in model.named_modules():
        t = getattr(m, "input_transform", None)
        if t is None or isinstance(t, HeadRotation):
            continue
        n = m.in_features if hasattr(m, "in_features") else m.weight.shape[1]
        out.append(OnlineInput(name, input_kind(t), transform_matrix(t, n)))
    return out


def online_kinds(model: nn.Module, quantizes_qk: bool) -> tuple[str, ...]:
    """The kinds of online transform ``model`` runs (in :data:`ONLINE_KINDS` order); a rotation of queries and
    keys counts only where they are quantized (``quantizes_qk``: activations or the KV cache), else it changes
    nothing."""
    found = set()
    for m in model.modules():
        t = getattr(m, "input_transform", None)
        if isinstance(t, HeadRotation):
            if quantizes_qk:
                found.add("qk_rotation")
        elif t is not None:
            found.add(input_kind(t))
        if getattr(m, "output_rotation", None) is not None:
            found.add("norm_output_rotation")
    return tuple(k for k in ONLINE_KINDS if k in found)
