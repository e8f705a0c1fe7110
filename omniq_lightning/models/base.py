"""`ModelAdapter`: what the rest of the library may know about a model family, and block capture.

An adapter *declares* structure: where the blocks are, which linears stay in full precision, where a
transform can sit (:class:`~omniq_lightning.transforms.TransformSite`), which attention modules
get quantized matmuls, how its norms scale (``x * w`` or Gemma's ``x * (1 + w)``), and how a block is
put into (and back out of) the shape the quantizers work on (MoE experts as one linear per expert).
Statistics and algorithms live in ``transforms/`` and ``methods/``.

Capture is family-independent: for one forward pass every block is replaced by a recorder that keeps
the keyword arguments the model passes to it (attention mask, position ids, rotary embeddings: per block,
so models that alternate sliding-window and global attention, with a rotary embedding per layer type,
replay exactly) and passes its input through; block 0's recorder keeps the hidden states, the last one
stops the forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omniq_lightning.nn import QuantLinear, QuantMatMul, register_attention, swap_linears
from omniq_lightning.quant import WeightFormat
from omniq_lightning.transforms import (
    BlockSetup,
    InputStats,
    LETNorm,
    LETPair,
    OnlineRotations,
    QuantBlock,
    TransformSite,
    initial_pair,
)
from omniq_lightning.transforms.affine import AffinePair
from omniq_lightning.transforms.rotation import HeadRotation, OnlineRotation

# Keyword arguments of a decoder layer that belong to generation, not to a standalone block call.
_GENERATION_KWARGS = {"past_key_values", "past_key_value", "cache", "use_cache", "cache_position", "output_attentions"}
FULL_PRECISION = WeightFormat(bits=16)


@dataclass(frozen=True)
class ModelSites:
    """Where the residual stream enters and leaves the blocks, by module name in the model.

    embedding: the token embedding (its output is block 0's input, after ``embedding_scale`` for Gemma).
    final_norm: the norm after the last block; head: the output projection (``lm_head``).
    tied: the head's weight is the embedding's (a transform of one is a transform of the other).
    extra: modules between them and the blocks that see the residual stream too (OPT's project_in / project_out).
    """

    embedding: str
    final_norm: str
    head: str
    tied: bool
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResidualWriters:
    """Where a block writes to the residual stream (names within a prepared block).

    linears: their outputs are added to the residual stream (a rotation of the stream folds into their rows).
    norms: norms between an output projection and the residual stream (Gemma's sandwich norms): a rotation of the
      stream is applied online after them.
    """

    linears: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()


@dataclass
class BlockContext:
    """Everything besides the hidden states that one block needs to run standalone.

    Captured from a batch of one sequence: tensors with a batch dimension of 1 broadcast over any
    batch of sequences of the same length.
    """

    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> BlockContext:
        return BlockContext({k: _move(v, device) for k, v in self.kwargs.items()})


def _move(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    return value


def attach_online_rotations(block: nn.Module, rotations: OnlineRotations, sites: list[TransformSite]) -> None:
    """Give the quantized block the rotations it applies online: R3 in each quantized attention's slot, R4 in the
    down projections' slots (where the model-level stage has not already put one: its weight must then hold the
    inverse, as a loaded export's does)."""
    if rotations.qk:
        for s in sites:
            if s.location == "qk":
                for m in block.modules():
                    if isinstance(m, QuantMatMul) and m.input_transform is None:
                        m.input_transform = HeadRotation(s.heads.head_dim, rotations.seed)
    if rotations.down:
        for s in sites:
            if s.location == "up_down":
                for name in s.targets:
                    lin = block.get_submodule(name)
                    if lin.input_transform is None:
                        lin.input_transform = OnlineRotation(lin.in_features, rotations.seed)


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output head's weight is the token embedding's (one tensor)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


class _StopForward(Exception):
    """Raised by the last block's recorder once every block's call is recorded."""


class _Recorder(nn.Module):
    """Stands in for block ``index`` during capture: records its call, returns its input unchanged."""

    def __init__(self, block: nn.Module, index: int, last: bool, sink: Callable[[int, torch.Tensor, dict], None]):
        super().__init__()
        self.block = block
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink(self.index, hidden, kwargs)
        if self.last:
            raise _StopForward
        return hidden

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # models may read attributes of their layers (e.g. attention_type)
            return getattr(super().__getattr__("block"), name)


@dataclass(frozen=True)
class GGUFLayout:
    """A family as llama.cpp holds it.

    ``arch``: its GGUF architecture (``general.architecture``, the ``gguf`` package's tensor-name map);
    ``permuted_rows``: the linears whose output rows llama.cpp orders differently from Hugging Face (LLaMA's query
    and key rows: ``{name suffix: number of heads}``, rotary halves interleaved per head); ``norm_shift``: added to
    every norm weight (Gemma computes ``x * (1 + w)`` and llama.cpp stores ``1 + w``); ``text_prefixes``: where
    the text model's tensors are, in memory and in the checkpoint transformers saves (a multimodal checkpoint's
    other towers are not written: llama.cpp reads them from a separate projector file); ``config``: the text model's configuration (the metadata's source); ``rope``: the
    rotary parameters of its global-attention layers (``rope_type``, ``rope_theta``, ``factor``);
    ``separate_head``: whether llama.cpp reads an untied output head; ``hparams``: the family's own metadata, by
    the name of the ``gguf`` writer's ``add_<name>`` method; ``unsupported``: why llama.cpp would compute another
    function than this model's (None: it computes this one)."""

    arch: str
    config: dict[str, Any]
    permuted_rows: dict[str, int] = field(default_factory=dict)
    norm_shift: float = 0.0
    text_prefixes: tuple[str, ...] = ("model",)
    rope: dict[str, Any] = field(default_factory=dict)
    separate_head: bool = True
    hparams: dict[str, Any] = field(default_factory=dict)
    unsupported: str | None = None

    def source_name(self, key: str) -> str | None:
        """A tensor's or module's name as the ``gguf`` name map reads it (the text model under ``model.``), or
        None for one outside the text model."""
        if key == "lm_head" or key.startswith("lm_head."):
            return key
        for prefix in self.text_prefixes:
            if key.startswith(prefix + "."):
                return "model." + key[len(prefix) + 1:]
        return None


def flat_rope(config: dict) -> dict[str, Any]:
    """A Hugging Face config's rotary parameters as one mapping (transformers 5's ``rope_parameters``, or the older
    ``rope_theta`` with ``rope_scaling``)."""
    params = dict(config.get("rope_parameters") or {})
    if not params:
        params = {"rope_theta": config.get("rope_theta"), **(config.get("rope_scaling") or {})}
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def interleave_rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """The order in which llama.cpp stores the rows of a LLaMA query/key projection: within each head, the two
    rotary halves interleaved (``convert_hf_to_gguf``'s permute). ``w_gguf = w_hf[index]``."""
    head = rows // heads
    return torch.arange(rows).reshape(heads, 2, head // 2).transpose(1, 2).reshape(rows)


class ModelAdapter:
    """Base adapter. Subclasses name the model's parts; nothing outside ``models/`` knows them."""

    model_types: tuple[str, ...] = ()
    recipe_family: str = ""  # which released recipes apply ("llama": RMSNorm, rotary, gated MLP; "opt")
    let_for_weight_only: bool = False  # whether LET is used for weight-only settings when a method leaves it to the family
    norm_offset: float = 0.0  # norms compute x * (offset + w): 0 for LLaMA / LayerNorm, 1 for Gemma
    required_attn_implementation: str | None = None  # e.g. "eager" where sdpa would compute something else
    experts: bool = False  # its blocks hold mixture-of-experts MLPs
    residual_norm: str = "rms"  # the norms reading the residual stream: "rms" (x * w) or "layer" (mean, bias)
    fused_experts: bool = False  # its checkpoint holds the experts as fused 3-D tensors (no per-linear packing)
    gguf_archs: dict[str, str] = {}  # model type -> llama.cpp's architecture (``gguf_layout``; none: no GGUF file)

    # --- structure -------------------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules that run before block 0 (embeddings, positions): needed on the device to capture."""
        raise NotImplementedError

    def context_length(self, model: nn.Module) -> int:
        return int(model.config.get_text_config().max_position_embeddings)

    def hidden_size(self, model: nn.Module) -> int:
        """The width of the hidden states between blocks (the text model's, for a multimodal checkpoint)."""
        return int(model.config.get_text_config().hidden_size)

    def attention_modules(self, block: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def residual_writers(self, block: nn.Module) -> ResidualWriters:
        """Where a prepared block writes to the residual stream (for rotations of the stream)."""
        raise NotImplementedError

    def model_sites(self, model: nn.Module) -> ModelSites:
        """The parts of the model outside its blocks that a whole-model pass may transform (names in the model)."""
        raise NotImplementedError

    def sites(self, block: nn.Module) -> list[TransformSite]:
        """Where transforms can sit in ``block`` (a prepared block: :meth:`prepare_block`), and what folds there."""
        raise NotImplementedError

    def keep_full_precision(self, block: nn.Module) -> set[str]:
        """Linears that are never quantized (e.g. MoE shared-expert gates), by name within the block."""
        return set()

    def prepare_block(self, block: nn.Module) -> nn.Module:
        """The block in the shape the quantizers work on (same function); e.g. fused MoE experts unfused."""
        return block

    def finish_block(self, block: nn.Module) -> nn.Module:
        """The quantized, folded block back in the model's own shape where that is possible (for export)."""
        return block

    @contextlib.contextmanager
    def export_layout(self, model: nn.Module) -> Iterator[None]:
        """While active, the model is in its own layout (what ``save_pretrained`` must write): blocks that stay
        in the quantizers' shape (e.g. MoE experts with input quantizers) are shown fused."""
        yield

    def blocks_prefix(self, model: nn.Module) -> str:
        """The blocks' path in the model (``model.layers``): block i's linears are ``{prefix}.{i}.{name}``."""
        blocks = self.blocks(model)
        return next(name for name, m in model.named_modules() if m is blocks)

    def check_setup(self, model: nn.Module, setup: BlockSetup) -> None:
        """Refuse a block setup this model cannot take (e.g. transforms its blocks cannot absorb), before calibration."""

    # --- running blocks ----------------------------------------------------------------------------------------
    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """Run one block standalone; returns its output hidden states."""
        out = block(hidden, **ctx.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def capture(
        self, model: nn.Module, batches: Iterable[torch.Tensor], store, device: torch.device | str
    ) -> list[BlockContext]:
        """Run ``batches`` of token ids (shape ``[1, seqlen]``) through the model with every block replaced by a
        recorder; writes each batch's block-0 input to ``store[i]`` (an activation cache) and returns the
        context of every block (from the first batch: all batches share them, same length and no padding).
        Blocks whose calls are identical share one context object."""
        blocks = self.blocks(model)
        originals = list(blocks)
        calls: dict[int, dict] = {}
        hidden0: list[torch.Tensor] = []

        def sink(index: int, hidden: torch.Tensor, kwargs: dict) -> None:
            if index == 0:
                hidden0.append(hidden)
            calls.setdefault(index, {k: v for k, v in kwargs.items() if k not in _GENERATION_KWARGS})

        for i, block in enumerate(originals):
            blocks[i] = _Recorder(block, i, i == len(originals) - 1, sink)
        try:
            n = 0
            for ids in batches:
                if ids.dim() != 2 or ids.shape[0] != 1:
                    raise ValueError(f"capture expects token ids of shape [1, seqlen], got {tuple(ids.shape)}")
                hidden0.clear()
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the last block was never called: is the adapter pointing at the right blocks?")
                store[n] = hidden0[0][0]
                n += 1
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
        if not calls:
            raise ValueError("capture needs at least one batch of calibration data")
        shared: dict[tuple, BlockContext] = {}
        contexts = []
        for i in range(len(originals)):
            kwargs = calls[i]
            key = tuple((k, id(v)) for k, v in sorted(kwargs.items()))
            contexts.append(shared.setdefault(key, BlockContext(kwargs)))
        return contexts

    # --- quantization ------------------------------------------------------------------------------------------
    def base_attention(self, attn: nn.Module) -> Callable:
        """The attention function the module runs now (eager: its family's own implementation)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        impl = attn.config._attn_implementation
        if impl in (None, "eager"):
            return sys.modules[type(attn).__module__].eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS[impl]

    def build_quant_block(self, block: nn.Module, setup: BlockSetup, stats: InputStats | None = None) -> QuantBlock:
        """Swap in ``QuantLinear``s (and ``QuantMatMul``s) and register the diagonal transforms the setup asks for
        (``setup.scale_locations``, initialised from ``stats``: the fp block's per-channel input ranges); ``block``
        must already be prepared (:meth:`prepare_block`)."""
        spec = setup.spec
        sites = self.sites(block)
        chosen = [s for s in sites if s.location in setup.scale_locations and s.diagonal_folds]
        if chosen and stats is None:
            raise ValueError("LET needs the block's input statistics to initialise its scales")
        specs = [p for s in chosen if (p := initial_pair(s, block, stats, setup.scale_alpha, setup.scale_shift)) is not None]
        keep = self.keep_full_precision(block)

        def make(name: str, lin: nn.Linear) -> QuantLinear:
            if name in keep:
                return QuantLinear(lin, spec, quantize_input=False, fmt=FULL_PRECISION)
            return QuantLinear(lin, spec, quantize_input=spec.quantizes_activations, fmt=setup.formats.get(name))

        swap_linears(block, make)
        if spec.quantizes_activations or spec.quantizes_kv or setup.rotations.qk:
            name = register_attention()
            for attn in self.attention_modules(block):
                attn.omniq_matmul = QuantMatMul(spec.a_bits, spec.kv_bits, spec.a_symmetric, self.base_attention(attn))
                attn.config = copy.copy(attn.config)  # this module alone switches to the quantized attention
                attn.config._attn_implementation = name
        for p in specs:
            if p.location == "norm" and not isinstance(block.get_submodule(p.source), LETNorm):
                block.set_submodule(p.source, LETNorm(block.get_submodule(p.source), self.norm_offset))
        attach_online_rotations(block, setup.rotations, sites)
        affine = {s.name: AffinePair(s, block) for s in sites if s.location in setup.affine_locations and
                  (s.location != "norm" or s.source is not None)}
        return QuantBlock(block, {p.name: LETPair(p) for p in specs}, self.call_block, sites, affine)

    # --- export layouts ----------------------------------------------------------------------------------------
    def checkpoint_prefixes(self, config: dict) -> dict[str, str]:
        """Where the checkpoint transformers saves names a part otherwise than the loaded model does:
        ``{prefix in the checkpoint: prefix in memory}`` (none for most families)."""
        return {}

    def gguf_layout(self, config: dict) -> GGUFLayout | None:
        """How llama.cpp names and lays out this family's tensors (None: no GGUF layout for it): the architecture
        ``gguf_archs`` names for the model type; families add their own tensor order, norms and metadata."""
        arch = self.gguf_archs.get(config["model_type"])
        return None if arch is None else GGUFLayout(arch, config, rope=flat_rope(config))

    # --- helpers for subclasses --------------------------------------------------------------------------------
    @classmethod
    def supports(cls, model_type: str) -> bool:
        return model_type in cls.model_types
