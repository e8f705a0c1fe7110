"""QuaRot's rotations of a whole model (Ashkboos et al. 2024), the model-level stage's first transform pass.

* **Norms fused.** Each norm that reads the residual stream (RMSNorm ``x * w``, Gemma's ``x * (1 + w)``) hands its
  weight to the linears after it (their columns), and so does the final norm to the head; the norms become plain
  ``x / rms(x)``, which commutes with any rotation. A head tied to the embedding is untied first (the final
  norm's weight goes into the head only).
* **R1** (folded): the residual stream rotated by a randomised Hadamard ``R``: the embedding's rows ``E R``,
  every linear that reads the stream ``W R`` (columns; an MoE router too), every linear that writes to it
  ``R^T W`` (rows and bias), the head ``W R``. A norm between an output projection and the stream (Gemma's
  sandwich norms) rotates its output online instead.
* **R2** (folded): one Hadamard per value head, on v's rows and o's columns (each query head's columns take the
  rotation of the value head it reads).
* **R4** (online): one Hadamard before each down projection: its weight holds the inverse (``W M^T``), its input
  is rotated online (``OnlineInputLinear``, kept in the ``QuantLinear``'s input-transform slot).
* **R3** (online) is the quantized attention's: ``BlockSetup.rotations.qk``.

Every rotation is orthogonal, so the rotated model computes the original function (tested at 16 bits for every
family). The pass is deterministic from its settings (the seed), so a rerun rotates the model again the same way;
its record is what ``load_fake_quant`` needs to re-attach the online parts.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from omniq_lightning.nn import OnlineInputLinear
from omniq_lightning.passes.base import ModelPass, PassContext, PassResult
from omniq_lightning.transforms.rotation import OnlineRotation, hadamard_matrix, rotate_output_online

RESIDUAL_SEED_OFFSET = 1000  # R1's signs and factors apart from the per-head and down rotations'


@dataclass(frozen=True)
class RotationSettings:
    """``rotation`` config: which of QuaRot's rotations a run applies (R3 and R4 default to the settings that
    quantize what they protect)."""

    residual: bool = True  # R1
    values: bool = True  # R2
    qk: bool = True  # R3 (online; only where queries and keys are quantized)
    down: bool = True  # R4 (online)
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: dict, quantizes_activations: bool, quantizes_kv: bool) -> RotationSettings:
        data = {k: v for k, v in dict(cfg).items() if k not in ("name", "tag")}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown rotation setting(s) {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        for key in ("qk", "down"):
            if data.get(key, "auto") == "auto":
                data[key] = quantizes_kv or quantizes_activations if key == "qk" else quantizes_activations
        for key in ("residual", "values", "qk", "down"):
            if key in data and not isinstance(data[key], bool):
                raise ValueError(f"rotation.{key} must be true, false (or auto for qk, down), got {data[key]!r}")
        if isinstance(data.get("seed", 0), bool) or not isinstance(data.get("seed", 0), int):
            raise ValueError(f"rotation.seed must be an integer, got {data.get('seed')!r}")
        return cls(**data)


def effective_norm_weight(norm: nn.Module, offset: float) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if w is None or getattr(norm, "bias", None) is not None:
        raise ValueError(f"{type(norm).__name__}: rotations need norms of the form x * (offset + w) without a bias")
    return w.detach().double() + offset


@torch.no_grad()
def fuse_norm(norm: nn.Module, consumers: list[nn.Module], offset: float) -> None:
    """Move ``norm``'s weight into the columns of the linears (or routers) that read its output."""
    w = effective_norm_weight(norm, offset)
    for lin in consumers:
        lin.weight.data = (lin.weight.double() * w[None, :]).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0 - offset)


@torch.no_grad()
def rotate_columns(lin: nn.Module, r: torch.Tensor) -> None:
    """``W R``: the linear reads an input rotated by ``R`` (``x R``)."""
    lin.weight.data = (lin.weight.double() @ r).to(lin.weight.dtype)


@torch.no_grad()
def rotate_rows(lin: nn.Module, r: torch.Tensor) -> None:
    """``R^T W`` (and bias): the linear's output comes out rotated (``y R``)."""
    lin.weight.data = (r.T @ lin.weight.double()).to(lin.weight.dtype)
    if getattr(lin, "bias", None) is not None:
        lin.bias.data = (lin.bias.double() @ r).to(lin.bias.dtype)


@torch.no_grad()
def rotate_value_heads(v: nn.Module, o: nn.Module, heads, m: torch.Tensor, rows: tuple[int, int] | None) -> None:
    """R2: each value head's output rows (rows ``rows`` of a fused projection) rotated by ``m`` (``M v``), each
    query head's slice of o's columns by ``m^T``."""
    hd = heads.head_dim
    a, z = rows if rows is not None else (0, v.weight.shape[0])
    w = v.weight.double()
    block = w[a:z].reshape(heads.n_kv, hd, -1)
    w[a:z] = torch.einsum("ij,hjk->hik", m, block).reshape(z - a, -1)
    v.weight.data = w.to(v.weight.dtype)
    if getattr(v, "bias", None) is not None:
        b = v.bias.double()
        b[a:z] = (b[a:z].reshape(heads.n_kv, hd) @ m.T).reshape(-1)
        v.bias.data = b.to(v.bias.dtype)
    wo = o.weight.double().reshape(o.weight.shape[0], heads.n_heads, hd)
    o.weight.data = torch.einsum("ohj,ij->ohi", wo, m).reshape(o.weight.shape).to(o.weight.dtype)


class RotationPass(ModelPass):
    name = "rotation"

    def __init__(self, settings: RotationSettings) -> None:
        self.settings = settings

    def check_model(self, traits) -> None:
        if traits.residual_norm != "rms" and self.settings.residual:
            raise ValueError("rotation.residual needs a family whose residual norms are RMSNorms (x * w): this "
                             "model's LayerNorms subtract the mean, which a rotation does not commute with. Use "
                             "rotation=none, or rotation.residual=false (per-head and down-projection rotations only)")

    def run(self, ctx: PassContext) -> PassResult:
        s, model, adapter = self.settings, ctx.model, ctx.adapter
        hidden = adapter.hidden_size(model)
        r = residual_rotation(hidden, s.seed).matrix() if s.residual else None  # randomised: signs, then Hadamard
        if r is not None:
            self.rotate_ends(model, adapter, r)
        blocks = adapter.blocks(model)
        for i in range(len(blocks)):
            block = adapter.prepare_block(blocks[i])
            if r is not None:
                self.rotate_residual(block, adapter, r, hidden, s.seed)
            sites = adapter.sites(block)
            if s.values:
                for site in (x for x in sites if x.location == "vo"):
                    m = hadamard_matrix(site.heads.head_dim, s.seed).T  # rows of M: M v per head
                    rotate_value_heads(block.get_submodule(site.source), block.get_submodule(site.targets[0]),
                                       site.heads, m, site.source_rows)
            if s.down:
                for site in (x for x in sites if x.location == "up_down"):
                    for name in site.targets:
                        lin = block.get_submodule(name)
                        rotation = OnlineRotation(lin.in_features, s.seed).to(lin.weight.device)
                        rotate_columns(lin, rotation.matrix())  # W M^T, the input rotated online: x M^T
                        block.set_submodule(name, OnlineInputLinear(lin, rotation))
            blocks[i] = adapter.finish_block(block)
        return PassResult(record={"settings": asdict(s), "hidden": hidden},
                          info={"settings": asdict(s), "hidden": hidden})

    @staticmethod
    @torch.no_grad()
    def rotate_ends(model: nn.Module, adapter, r: torch.Tensor) -> None:
        """The embedding and the head (the final norm fused into the head, which is untied from the embedding)."""
        sites = adapter.model_sites(model)
        emb, head = model.get_submodule(sites.embedding), model.get_submodule(sites.head)
        if head.weight is emb.weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
            model.config.get_text_config().tie_word_embeddings = False
        fuse_norm(model.get_submodule(sites.final_norm), [head], adapter.norm_offset)
        emb.weight.data = (emb.weight.double() @ r).to(emb.weight.dtype)
        rotate_columns(head, r)

    @staticmethod
    @torch.no_grad()
    def rotate_residual(block: nn.Module, adapter, r: torch.Tensor, hidden: int, seed: int) -> None:
        for site in adapter.sites(block):
            if site.location == "norm":
                consumers = [block.get_submodule(t) for t in site.targets]
                fuse_norm(block.get_submodule(site.source), consumers, adapter.norm_offset)
                for lin in consumers:
                    rotate_columns(lin, r)
        writers = adapter.residual_writers(block)
        for name in writers.linears:
            rotate_rows(block.get_submodule(name), r)
        for name in writers.norms:
            rotate_output_online(block.get_submodule(name), residual_rotation(hidden, seed))


def residual_rotation(hidden: int, seed: int) -> OnlineRotation:
    """R1 as an online module (``x -> x R``), one instance per place it runs (each moves with its block)."""
    return OnlineRotation(hidden, seed + RESIDUAL_SEED_OFFSET, signed=True)


def reattach_rotations(model: nn.Module, adapter, record: dict) -> None:
    """Put back, on a model loaded from an export of a rotated run, the rotations that run online outside the
    quantized blocks' slots: a rotated output after each sandwich norm (the folded ones are in the weights)."""
    settings = RotationSettings(**record["settings"])
    if not settings.residual:
        return
    for block in adapter.blocks(model):
        for name in adapter.residual_writers(adapter.prepare_block(copy.deepcopy(block))).norms:
            rotate_output_online(block.get_submodule(name), residual_rotation(record["hidden"], settings.seed))
